"""Shared fixtures: tiny random HF models built on the fly, the embedded model, leak checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY = dict(vocab_size=512, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-6, tie_word_embeddings=False)

# 8 experts, top 2; layer 1 of 3 dense (mlp_only_layers)
TINY_MOE = dict(num_hidden_layers=3, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                mlp_only_layers=[1], norm_topk_prob=True)


def build_tiny(kind: str, path: Path, seed: int = 0, **over: object) -> Path:
    """Save a tiny random HF model of `kind` (llama | qwen2 | qwen3 | qwen3_moe | mistral) to path."""
    import transformers as tf

    torch.manual_seed(seed)
    kw = {**TINY, **(TINY_MOE if kind == "qwen3_moe" else {}), **over}
    if kind == "llama":
        cfg = tf.LlamaConfig(**kw)
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(**kw)
        model = tf.Qwen2ForCausalLM(cfg)
    elif kind == "qwen3":
        cfg = tf.Qwen3Config(head_dim=16, **kw)
        model = tf.Qwen3ForCausalLM(cfg)
    elif kind == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(head_dim=16, **kw)
        model = tf.Qwen3MoeForCausalLM(cfg)
    elif kind == "mistral":
        cfg = tf.MistralConfig(**kw)
        model = tf.MistralForCausalLM(cfg)
    else:
        raise ValueError(kind)
    with torch.no_grad():  # random init of biases and norms too, so a mistake there shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return path


def kv_leak_free(llm: object) -> None:
    """Every page is free or held by the radix tree; clearing the tree frees all."""
    st = llm.engine.stats()
    assert st.running == st.waiting == st.requests == 0, st
    assert st.pages_used == 0, f"{st.pages_used} pages held by no live request"
    assert not llm.engine.check()  # incl. every slot returned, every page free or cached once
    llm.clear_cache()
    st = llm.engine.stats()
    assert st.pages_free == st.pages_total, st


@pytest.fixture(scope="session")
def embedded():
    from aengine import LLM

    llm = LLM(dtype="float32", device="cpu")
    yield llm
    llm.close()


@pytest.fixture
def llm_check():
    """Collects LLMs a test uses and asserts after it that none leaked KV."""
    used: list = []
    yield used.append
    for llm in used:
        kv_leak_free(llm)
