"""Greedy outputs equal HF transformers token for token (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from aengine import LLM, SamplingParams
from tests.conftest import build_tiny

PROMPTS = [[5, 17, 33, 2, 99, 100, 7], [1, 2, 3], list(range(40, 90)), [300] * 20 + [1, 2]]


def hf_greedy(path, prompts, n):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=0)
        outs.append(out[0, len(p):].tolist())
    return outs


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("page_size", [1, 4])
def test_matches_hf(kind, page_size, tmp_path, llm_check):
    path = build_tiny(kind, tmp_path / kind)
    want = hf_greedy(path, PROMPTS, 12)
    # page 4: 16-token prefill chunks with the decode rows riding along (mixed steps)
    mixed = dict(max_prefill_tokens=16, enable_mixed_chunk=True) if page_size == 4 else {}
    llm = LLM(str(path), dtype="float32", device="cpu", page_size=page_size, **mixed)
    llm_check(llm)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == want
    assert (llm.engine.stats().mixed_steps > 0) == bool(mixed)
    assert all(o.finish_reason == "length" for o in outs)
    assert [o.prompt_tokens for o in outs] == [len(p) for p in PROMPTS]


def test_llama3_rope_scaling(tmp_path, llm_check):
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
    path = build_tiny("llama", tmp_path / "l3", rope_scaling=rs)
    want = hf_greedy(path, PROMPTS[2:], 10)
    llm = LLM(str(path), dtype="float32", device="cpu")
    llm_check(llm)
    outs = llm.generate(PROMPTS[2:], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == want


def test_embedded_matches_hf_gguf(embedded, llm_check):
    """The embedded SmolLM2 (our GGUF conversion) against transformers loading the same GGUF."""
    import transformers as tf

    from aengine.weights import default_gguf

    g = default_gguf()
    model = tf.AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32)
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "Write a haiku about the sea."}],
             [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colors."}]]
    llm_check(embedded)
    outs = embedded.chat(chats, SamplingParams(max_tokens=24, temperature=0))
    for chat, out in zip(chats, outs):
        ids = torch.tensor([embedded.tokenizer.apply_chat_template(chat)])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
        assert out.token_ids == ref[0, ids.shape[1]:].tolist()
    assert outs[0].text == "The capital of France is Paris."
