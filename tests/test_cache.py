"""Radix prefix cache, chunked prefill and preemption keep greedy outputs identical."""

from __future__ import annotations

import pytest

from aengine import LLM, ContextLengthExceeded, SamplingParams

SYSTEM = ("You are a meticulous assistant. Answer in full sentences, cite no sources, and keep every "
          "answer under fifty words. Prefer plain words over jargon and explain any number you use. ") * 3
QUESTIONS = ["What is the capital of France?", "Name a primary color.", "What is two plus two?",
             "Which planet is largest?", "What do bees make?", "Say hello."]
GREEDY = SamplingParams(max_tokens=16, temperature=0)


def convs(system: str = SYSTEM) -> list[list[dict]]:
    return [[{"role": "system", "content": system}, {"role": "user", "content": q}] for q in QUESTIONS]


@pytest.fixture(scope="module")
def reference(embedded):
    outs = embedded.chat(convs(), SamplingParams(max_tokens=16, temperature=0))
    embedded.clear_cache()
    return [o.token_ids for o in outs]


@pytest.mark.parametrize("kw", [
    dict(cache="none"),
    dict(cache="radix", max_prefill_tokens=16),
    dict(cache="radix", max_prefill_tokens=64, page_size=4),
    dict(cache="none", max_prefill_tokens=16, disable_overlap=True),
    # a pool about two requests wide: admission waits for memory (preemption itself is forced in
    # test_preemption_and_two_large_requests)
    dict(cache="radix", kv_cache_tokens=260, max_prefill_tokens=64),
    dict(cache="none", kv_cache_tokens=260, page_size=4),
    # decode rows ride along in prefill steps, with and without overlap, and while memory is short
    dict(cache="radix", max_prefill_tokens=16, enable_mixed_chunk=True),
    dict(cache="none", max_prefill_tokens=32, page_size=4, enable_mixed_chunk=True, disable_overlap=True),
    dict(cache="radix", kv_cache_tokens=260, max_prefill_tokens=64, enable_mixed_chunk=True),
    # short prefill chunks only while others decode
    dict(cache="radix", max_prefill_tokens=64, max_prefill_tokens_decoding=8),
    dict(cache="radix", max_prefill_tokens=32, max_prefill_tokens_decoding=8, enable_mixed_chunk=True),
])
def test_same_greedy_outputs(kw, reference, llm_check):
    llm = LLM(dtype="float32", device="cpu", **kw)
    llm_check(llm)
    outs = llm.chat(convs(), GREEDY)
    assert [o.token_ids for o in outs] == reference
    mixed = llm.engine.stats().mixed_steps
    if not kw.get("enable_mixed_chunk"):
        assert mixed == 0
    elif "kv_cache_tokens" not in kw:  # in the small pool a prompt rarely fits beside a decode
        assert mixed > 0
    llm.close()


def test_shared_prefix_is_reused(embedded, llm_check):
    llm_check(embedded)
    embedded.clear_cache()
    first = embedded.chat(convs()[:1], GREEDY)[0]
    assert first.cached_tokens == 0
    before = embedded.stats().prefill_tokens
    second = embedded.chat(convs()[1:2], GREEDY)[0]
    shared = 0
    a, b = first.prompt_token_ids, second.prompt_token_ids
    while a[shared] == b[shared]:
        shared += 1
    assert shared > 100
    ps = embedded.engine.runner.page_size
    assert second.cached_tokens >= shared // ps * ps
    assert embedded.stats().prefill_tokens - before == second.prompt_tokens - second.cached_tokens
    # the same prompt again reuses all but its last token (whose logits give the first output)
    again = embedded.chat(convs()[1:2], GREEDY)[0]
    assert again.cached_tokens >= (again.prompt_tokens - 1) // ps * ps
    assert again.token_ids == second.token_ids


@pytest.mark.parametrize("mixed", [False, True])
def test_preemption_and_two_large_requests(mixed):
    # pool of 200 tokens; two prompts of ~90 tokens each generating 60: they cannot both finish resident
    llm = LLM(dtype="float32", device="cpu", kv_cache_tokens=201, max_prefill_tokens=32, enable_mixed_chunk=mixed)
    ids = llm.tokenizer.encode(SYSTEM)[:90]
    p = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    together = llm.generate([ids, ids[::-1]], p)
    assert llm.stats().preemptions > 0
    alone = [llm.generate([x], p)[0] for x in (ids, ids[::-1])]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert all(len(o.token_ids) == 60 for o in together)
    # one request that cannot fit even in an empty pool is refused at admission
    with pytest.raises(ContextLengthExceeded):
        llm.generate([ids * 3], p)
    from tests.conftest import kv_leak_free

    kv_leak_free(llm)
    llm.close()


def test_admission_first_then_chunks_alternate(llm_check):
    """Prompts that can be admitted are prefilled before anything decodes (a burst puts no prefill step
    between two tokens of the running requests); an admitted long prompt's remaining chunks alternate
    with the decode steps of the others (docs/architecture.md, "Chunked prefill")."""
    llm = LLM(dtype="float32", device="cpu", max_prefill_tokens=32)
    llm_check(llm)
    sched, ex = llm.engine.scheduler, llm.engine.executor
    steps: list[tuple[bool, int]] = []  # (decode, requests waiting) at each launch
    launch = ex.launch

    def record(inp, *more):
        steps.append((inp.decode, len(sched.waiting)))
        return launch(inp, *more)

    ex.launch = record
    long = [{"role": "user", "content": SYSTEM * 2 + "Summarise the above."}]
    # the long prompt last: once it is admitted nothing waits, and the four others decode
    outs = llm.chat(convs()[:4] + [long], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    assert all(len(o.token_ids) == 24 for o in outs)
    first_decode = next(i for i, (dec, _) in enumerate(steps) if dec)
    assert all(w == 0 for dec, w in steps if dec), steps  # nothing decoded while a prompt waited
    assert not steps[0][0] and all(not dec for dec, _ in steps[:first_decode])
    later = steps[first_decode:]
    chunks_after = sum(not dec for dec, _ in later)
    assert chunks_after >= 2, steps  # the long prompt was still being prefilled when the others decoded
    assert all(a[0] or b[0] for a, b in zip(later, later[1:])), steps  # ...one chunk between decode steps
    del ex.launch
    llm.close()


def test_trickle_alternates_with_decodes(llm_check):
    """Prompts arriving while a request decodes, less than a full prefill step of them (a trickle), get one
    prefill step per decode step, each within --max-prefill-tokens-decoding: the running request waits
    for one bounded prefill step per token (docs/architecture.md, "Chunked prefill")."""
    import asyncio

    llm = LLM(dtype="float32", device="cpu", max_prefill_tokens=64, max_prefill_tokens_decoding=8)
    llm_check(llm)
    eng, sched = llm.engine, llm.engine.scheduler
    steps: list[tuple[bool, int, int]] = []  # (decode, prompt tokens, requests waiting) at each launch
    launch = eng.executor.launch

    def record(inp, *more):
        steps.append((inp.decode, 0 if inp.decode else sum(inp.extend_lens), len(sched.waiting)))
        return launch(inp, *more)

    eng.executor.launch = record

    async def scenario() -> dict[str, list[int]]:
        decoding, finished, out = asyncio.Event(), asyncio.Event(), {}

        def emit(d, rid):
            if d.token_ids and rid == "a":
                decoding.set()
            if d.output is not None:
                out[rid] = d.output.token_ids
                if len(out) == 3:
                    finished.set()

        greedy = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        eng.submit("a", list(range(100, 120)), greedy, lambda d: emit(d, "a"))
        await decoding.wait()
        for rid, first in (("b", 200), ("c", 300)):  # 20 prompt tokens together: under a 64-token step
            eng.submit(rid, list(range(first, first + 10)), SamplingParams(max_tokens=4, temperature=0),
                       lambda d, rid=rid: emit(d, rid))
        await finished.wait()
        return out

    out = llm._loop.run_until_complete(scenario())
    assert len(out["a"]) == 40 and len(out["b"]) == 4 and len(out["c"]) == 4
    first_decode = next(i for i, (dec, _, _) in enumerate(steps) if dec)
    later = steps[first_decode:]
    prefills = [n for dec, n, _ in later if not dec]
    assert sum(prefills) == 20 and max(prefills) <= 8, steps  # b and c in chunks of at most 8 tokens
    assert all(a[0] or b[0] for a, b in zip(later, later[1:])), steps  # never two prefill steps in a row
    del eng.executor.launch
    llm.close()
