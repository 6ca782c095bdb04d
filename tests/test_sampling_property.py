"""Every accepted set of sampling values gives tokens the model's filtered distribution allows
(issue 18, finding 4: temperature 1e-38 or top_p 1e-46 passed validation, then streamed token 0
over and over). The allowed set is computed here, independently, from HF transformers' logits of
the same tiny model: softmax(logits / T), then min_p (relative to the most likely token), top_k and
top_p (the smallest prefix, most likely first, whose mass reaches top_p of what min_p and top_k
kept); greedy below the documented limits (T < 1e-5, top_p < 1e-6)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from aengine import LLM, SamplingParams
from tests.conftest import build_tiny, kv_leak_free

PROMPT = [5, 6, 7, 8, 9, 10, 11]
EPS = 1e-4  # logits: aengine and transformers differ by ~1e-6 in float32; a token this close to a cut may go either way


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LLM, torch.nn.Module]]:
    import transformers as tf

    path = build_tiny("llama", tmp_path_factory.mktemp("tiny"))
    llm = LLM(str(path), dtype="float32", device="cpu")
    ref = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    yield llm, ref
    kv_leak_free(llm)
    llm.close()


def allowed(logits: torch.Tensor, p: SamplingParams) -> set[int]:
    """Token ids that may be drawn from these next-token logits, erring towards allowing by EPS
    and by what float32 probabilities cannot tell apart (the sampler runs in float32)."""
    x = logits.double()
    if p.temperature < 1e-5 or p.top_p < 1e-6:
        return set(torch.nonzero(x >= x.max() - EPS).flatten().tolist())
    s = x / p.temperature  # log-probabilities up to a constant
    top, tol = s.max(), EPS / p.temperature + 1e-5
    keep = torch.ones_like(s, dtype=torch.bool)
    if p.min_p > 0:  # p_i >= min_p * p_max
        keep &= s >= top + math.log(p.min_p) - tol
    if 0 < p.top_k < s.numel():
        keep &= s >= s.sort(descending=True).values[p.top_k - 1] - tol
    if p.top_p < 1:
        # token i stays while the mass surely ahead of it is below top_p of the kept mass, that mass
        # taken as large as the tolerance allows and the mass ahead of it as small
        hi = torch.where(keep, torch.exp(s + tol - top), 0.0)
        lo = torch.where(keep, torch.exp(s - tol - top), 0.0)
        ahead = torch.stack([lo[s > si + 2 * tol].sum() for si in s])
        keep &= ahead < p.top_p * hi.sum() * (1 + 1e-4)
    return set(torch.nonzero(keep).flatten().tolist())


temperatures = st.one_of(st.just(0.0), st.floats(1e-45, 1e-5), st.floats(1e-5, 0.05), st.floats(0.05, 3.0),
                         st.floats(3.0, 1e30), st.sampled_from([1e-38, 1e-40, 5e-324, 1e-5, 1.0]))
top_ps = st.one_of(st.floats(5e-324, 1e-6), st.floats(1e-6, 1.0, exclude_min=True), st.just(1.0),
                   st.sampled_from([1e-46, 1e-300, 1e-7, 0.5]))
values = st.builds(SamplingParams, temperature=temperatures, top_p=top_ps,
                   top_k=st.one_of(st.just(0), st.just(-1), st.integers(1, 600)),
                   min_p=st.one_of(st.just(0.0), st.floats(0.0, 1.0), st.sampled_from([1e-300, 1.0])),
                   seed=st.one_of(st.none(), st.integers(0, 2**63 - 1)),
                   max_tokens=st.integers(1, 6), ignore_eos=st.just(True))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(batch=st.lists(values, min_size=1, max_size=4))
def test_sampled_tokens_are_allowed(models: tuple[LLM, torch.nn.Module], batch: list[SamplingParams]) -> None:
    llm, ref = models
    for p in batch:
        p.validate()  # accepted values only
    outs = llm.generate([PROMPT] * len(batch), batch)  # one batch: greedy and sampled rows together
    for p, out in zip(batch, outs, strict=True):
        assert len(out.token_ids) == p.max_tokens
        seq = PROMPT + out.token_ids
        with torch.no_grad():
            logits = ref(torch.tensor([seq[:-1]])).logits[0, len(PROMPT) - 1:]
        for i, tok in enumerate(out.token_ids):
            assert tok in allowed(logits[i], p), (p, i, tok, out.token_ids)
