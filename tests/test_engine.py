"""Continuous batching, sampling, stops and errors through the offline API on the embedded model."""

from __future__ import annotations

from pathlib import Path

import pytest

from aengine import LLM, ContextLengthExceeded, InvalidRequest, SamplingParams

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Count from one to ten in words."}],
    [{"role": "user", "content": "Write a short poem about autumn leaves."}],
    [{"role": "user", "content": "Give me three tips for learning to cook."}],
    [{"role": "user", "content": "Hi"}],
]
GREEDY = SamplingParams(max_tokens=24, temperature=0)


def test_batch_equals_one_at_a_time(embedded, llm_check):
    llm_check(embedded)
    together = embedded.chat(CHATS, GREEDY)
    alone = [embedded.chat([c], GREEDY)[0] for c in CHATS]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert together[0].text == "The capital of France is Paris."
    assert together[0].finish_reason == "stop" and together[1].finish_reason == "length"
    assert len(together[1].token_ids) == 24


def test_seeded_sampling_reproducible_in_any_batch(embedded, llm_check):
    llm_check(embedded)
    p = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=50, min_p=0.01, seed=1234)
    alone = embedded.chat([CHATS[2]], p)[0]
    others = [SamplingParams(max_tokens=20, temperature=1.0, seed=None)] * 3
    batch = embedded.chat([CHATS[0], CHATS[2], CHATS[1], CHATS[3]], [others[0], p, others[1], others[2]])
    assert batch[1].token_ids == alone.token_ids
    other_seed = embedded.chat([CHATS[2]], SamplingParams(max_tokens=20, temperature=0.9, seed=99))[0]
    assert other_seed.token_ids != alone.token_ids


def test_stop_strings_and_tokens(embedded, llm_check):
    llm_check(embedded)
    full = embedded.chat([CHATS[1]], SamplingParams(max_tokens=40, temperature=0))[0]
    stop = "3\n4."  # spans several tokens
    assert stop in full.text, full.text
    cut = embedded.chat([CHATS[1]], SamplingParams(max_tokens=40, temperature=0, stop=["zebra", stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    tok = full.token_ids[3]
    by_id = embedded.chat([CHATS[1]], SamplingParams(max_tokens=40, temperature=0, stop_token_ids=[tok]))[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == full.token_ids[: full.token_ids.index(tok) + 1]
    eos = embedded.chat([CHATS[0]], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    assert eos.finish_reason == "length" and len(eos.token_ids) == 40


def test_raw_prompts_and_ids(embedded, llm_check):
    llm_check(embedded)
    a = embedded.generate(["The capital of France is"], GREEDY)[0]
    ids = embedded.tokenizer.encode("The capital of France is")
    b = embedded.generate([ids], GREEDY)[0]
    assert a.token_ids == b.token_ids and a.prompt_tokens == len(ids)
    assert "Paris" in a.text


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-3), "top_k"),
        (dict(min_p=2.0), "min_p"),
        (dict(temperature=float("nan")), "temperature"),
    ],
)
def test_bad_sampling_params(embedded, llm_check, kw, msg):
    llm_check(embedded)
    with pytest.raises(InvalidRequest, match=msg):
        embedded.generate(["hello"], SamplingParams(**kw))


def test_bad_prompts(embedded, llm_check):
    llm_check(embedded)
    with pytest.raises(InvalidRequest, match="empty"):
        embedded.generate([""], GREEDY)
    with pytest.raises(InvalidRequest, match="empty"):
        embedded.generate([[]], GREEDY)
    with pytest.raises(InvalidRequest, match="out of range"):
        embedded.generate([[1, 2, 10**9]], GREEDY)
    for bad in ([1, True], [1, 2.0], [1, "2"], [1, None]):  # only plain ints are token ids
        with pytest.raises(InvalidRequest, match="list of integers"):
            embedded.engine.encode(input_ids=bad)
    n = embedded.engine.max_model_len
    with pytest.raises(ContextLengthExceeded, match=f"{n}"):
        embedded.generate([[5] * n], GREEDY)
    with pytest.raises(ContextLengthExceeded, match="max_tokens"):
        embedded.generate([[5] * (n - 10)], SamplingParams(max_tokens=20))
    # nothing was harmed: a normal request still works
    assert embedded.chat([CHATS[0]], GREEDY)[0].text == "The capital of France is Paris."


def test_unknown_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    with pytest.raises(ValueError, match="unsupported architecture"):
        LLM(str(tmp_path), load_format="dummy")
    for bad in ("{not json", "[1, 2]", "null", '"text"'):  # read without transformers: each is one clear error
        (tmp_path / "config.json").write_text(bad)
        with pytest.raises(ValueError, match="cannot read the model config"):
            LLM(str(tmp_path), load_format="dummy")


def test_borrowed_tokenizer_beyond_vocab(tmp_path, llm_check):
    """A tiny model without a tokenizer borrows the embedded one (vocab 49,152 > 512): text whose
    ids the model lacks is refused clearly, input_ids still work."""
    from tests.conftest import build_tiny

    llm = LLM(str(build_tiny("llama", tmp_path / "m")), dtype="float32", device="cpu")
    llm_check(llm)
    with pytest.raises(InvalidRequest, match="vocabulary"):
        llm.generate(["The capital of France is"], GREEDY)
    p = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    assert len(llm.generate([[1, 2, 3]], p)[0].token_ids) == 5


def test_stale_gguf_conversions_are_removed(tmp_path, monkeypatch):
    """The embedded model is converted once per source file; copies whose source is gone or has
    changed since (an upgraded or removed package) are deleted, nothing else is."""
    import json

    from aengine import weights

    real, gguf = weights.resolve_model(None), weights.default_gguf()
    monkeypatch.setenv("AENGINE_CACHE", str(tmp_path))
    live = tmp_path / real.name
    live.symlink_to(real, target_is_directory=True)

    def entry(name: str, source: Path | None) -> Path:
        d = tmp_path / name
        d.mkdir()
        if source is not None:
            (d / "DONE").write_text(json.dumps({"source": str(source)}))
        return d

    gone = entry(f"{gguf.stem}-0123456789abcdef", tmp_path / "uninstalled" / gguf.name)
    changed = entry(f"{gguf.stem}-fedcba9876543210", gguf)  # same file, an earlier size or mtime
    partial = entry(f"{gguf.stem}-1111111111111111.tmp42", None)  # another process converting
    other = entry("other-model-2222222222222222", tmp_path / "missing.gguf")
    assert weights.resolve_model(None) == live
    assert live.exists() and partial.exists() and other.exists()
    assert not gone.exists() and not changed.exists()


def test_degenerate_sampling_values_are_greedy(tmp_path) -> None:
    """Temperatures and top_p values float32 cannot use (1/T overflows, top_p rounds to 0) sample
    the most likely token, as temperature 0 does, instead of streaming token 0 over and over."""
    from tests.conftest import build_tiny

    llm = LLM(str(build_tiny("llama", tmp_path)), dtype="float32", device="cpu")
    prompt = [[5, 6, 7, 8, 9]]
    greedy = llm.generate(prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0].token_ids
    for kw in (dict(temperature=1e-38), dict(temperature=1e-40), dict(temperature=1e-6),
               dict(temperature=1.0, top_p=1e-46), dict(temperature=1.0, top_p=1e-300),
               dict(temperature=0.7, top_p=1e-7)):
        got = llm.generate(prompt, SamplingParams(max_tokens=6, ignore_eos=True, **kw))[0].token_ids
        assert got == greedy, (kw, got, greedy)
    llm.close()


def test_gguf_conversion_is_shared_by_copies_of_the_file(tmp_path, monkeypatch):
    """The conversion cache is keyed by the file's content: the same package file installed in
    another virtual environment (another path) reuses the conversion instead of making a second."""
    import shutil

    from aengine import weights

    real, gguf = weights.resolve_model(None), weights.default_gguf()
    monkeypatch.setenv("AENGINE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / real.name).symlink_to(real, target_is_directory=True)
    other_env = tmp_path / "venv2" / gguf.name
    other_env.parent.mkdir()
    shutil.copy(gguf, other_env)
    assert weights.gguf_to_hf(other_env) == tmp_path / "cache" / real.name
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [real.name]  # nothing converted again


def test_prefill_graph_buckets() -> None:
    """Every prefill step up to the limit has a bucket that pads it by under 256 rows (under half below 512),
    all multiples of 16 (one variant of the fused QKV kernel); 0 turns prefill graphs off."""
    from aengine.runtime.cuda_graph import prefill_buckets

    assert prefill_buckets(0) == [] and prefill_buckets(8) == []
    for limit in (16, 100, 2048, 3000):
        sizes = prefill_buckets(limit)
        assert sizes == sorted(sizes) and all(n % 16 == 0 and n <= limit for n in sizes)
        for t in range(1, sizes[-1] + 1):
            n = next(n for n in sizes if n >= t)
            assert n - t < 256 and (n < 512 and n < 2 * t + 16 or n >= 512), (limit, t, n)
