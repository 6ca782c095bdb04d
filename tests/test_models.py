"""Greedy outputs equal HF transformers token for token (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from aengine import LLM, ContextLengthExceeded, SamplingParams
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


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "qwen3_moe", "mistral"])
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


@pytest.mark.parametrize("kind", ["qwen3_moe", "mistral"])
@pytest.mark.parametrize("kw", [
    dict(page_size=16, max_prefill_tokens=16, enable_mixed_chunk=True),  # chunks; the prefix from the radix tree
    dict(page_size=16, max_prefill_tokens=32, kv_cache_tokens=208),  # a pool two requests wide: preemption
])
def test_cache_features_match_hf(kind, kw, tmp_path, llm_check):
    path = build_tiny(kind, tmp_path / kind)
    prefix = [(7 * i) % 500 + 3 for i in range(64)]
    prompts = [prefix + list(range(20, 46)), prefix + list(range(300, 324))]
    want = hf_greedy(path, prompts, 60)
    llm = LLM(str(path), dtype="float32", device="cpu", **kw)
    llm_check(llm)
    p = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    assert [o.token_ids for o in llm.generate(prompts, p)] == want
    if "kv_cache_tokens" in kw:
        assert llm.stats().preemptions > 0
    else:
        assert llm.engine.stats().mixed_steps > 0
        again = llm.generate(prompts[::-1], p)
        assert [o.token_ids for o in again] == want[::-1]
        assert all(o.cached_tokens >= 64 for o in again)


def test_moe_dummy_weights_under_transformers_names(tmp_path, llm_check):
    """Dummy weights come under transformers' own names, all experts stacked in one tensor
    (gate_up_proj, down_proj), unlike checkpoints (one tensor per expert and projection)."""
    from aengine.weights import dummy_weights, load_hf_config

    path = build_tiny("qwen3_moe", tmp_path / "m")
    llm = LLM(str(path), load_format="dummy", dtype="float32", device="cpu")
    llm_check(llm)
    w = dict(dummy_weights(llm.engine.runner.model.checkpoint_shapes(load_hf_config(path)), 0, torch.device("cpu")))
    layers = llm.engine.runner.model.layers
    assert torch.equal(layers[2].mlp.experts.w13, w["model.layers.2.mlp.experts.gate_up_proj"])
    assert torch.equal(layers[2].mlp.experts.w2, w["model.layers.2.mlp.experts.down_proj"])
    assert torch.equal(layers[2].mlp.gate.weight, w["model.layers.2.mlp.gate.weight"])
    assert not hasattr(layers[1].mlp, "experts")  # mlp_only_layers
    assert len(llm.generate([PROMPTS[0]], SamplingParams(max_tokens=4, ignore_eos=True))[0].token_ids) == 4


@pytest.mark.parametrize("kind,tied", [("llama", False), ("llama", True), ("qwen2", False), ("qwen3", True),
                                       ("qwen3_moe", False), ("mistral", False)])
def test_checkpoint_shapes_are_transformers_own(tmp_path, kind, tied):
    """Dummy weights are drawn under checkpoint_shapes' names and shapes, listed from the config instead
    of building transformers' model: they must be exactly that model's parameters."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from aengine.models import model_class
    from aengine.weights import load_hf_config

    path = build_tiny(kind, tmp_path / "m", tie_word_embeddings=tied)
    cfg = load_hf_config(path)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
        want = {n: tuple(p.shape) for n, p in hf.named_parameters()}
    with torch.device("meta"):
        got = list(model_class(cfg)(cfg).checkpoint_shapes(cfg))
    assert len(got) == len(dict(got)) and dict(got) == want


# what the engine reads of a config, with the default it reads an absent one as (None: it reads it directly)
READ = dict.fromkeys(("architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "max_position_embeddings", "rms_norm_eps", "sliding_window")) | {
    "tie_word_embeddings": False, "attention_bias": False, "num_key_value_heads": "heads", "head_dim": None}
READ_MOE = dict.fromkeys(("num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step", "norm_topk_prob",
                          "num_experts")) | {"mlp_only_layers": []}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "qwen3_moe", "mistral"])
@pytest.mark.parametrize("minimal", [False, True], ids=["saved", "minimal"])
def test_config_reads_as_transformers_does(tmp_path, kind, minimal):
    """load_hf_config reads config.json without transformers: what the engine reads must equal AutoConfig's,
    for a saved config and for one reduced to the keys a family cannot do without (the rest: defaults)."""
    import json

    from transformers import AutoConfig

    from aengine.layers.rotary import RotaryEmbedding, rope_params
    from aengine.weights import load_hf_config

    window = {"sliding_window": 64, **({"use_sliding_window": True} if kind == "qwen2" else {})}
    if kind == "llama":  # Llama 3.1's scaled rotary, as its config.json gives it
        window["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    path = build_tiny(kind, tmp_path / "m", **window)
    if minimal:
        raw = json.loads((path / "config.json").read_text())
        keep = {"architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "num_experts",
                "num_local_experts", "num_experts_per_tok", "moe_intermediate_size"}
        (path / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if k in keep}))
    ours, theirs = load_hf_config(path), AutoConfig.from_pretrained(path)
    for name, default in (READ | (READ_MOE if kind == "qwen3_moe" else {})).items():
        default = ours.num_attention_heads if default == "heads" else default
        assert getattr(ours, name, default) == getattr(theirs, name, default), name
    # the rotary tables the engine builds from each (the same frequencies, however the dict is spelt)
    tables = [RotaryEmbedding(16, 64, *rope_params(c)).cos_sin for c in (ours, theirs)]
    assert torch.equal(*tables)


def test_sliding_window_caps_the_context(tmp_path, llm_check):
    """Attention here sees the whole context, so a Mistral config's sliding window becomes the
    context limit: within it the outputs are the windowed model's; past it nothing is served."""
    path = build_tiny("mistral", tmp_path / "m", sliding_window=64)
    want = hf_greedy(path, PROMPTS, 12)  # each prompt and its 12 tokens fit in 64
    llm = LLM(str(path), dtype="float32", device="cpu")
    llm_check(llm)
    assert llm.engine.max_model_len == 64
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == want
    with pytest.raises(ContextLengthExceeded):
        llm.generate([list(range(3, 73))], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="longer than the model's sliding window"):
        LLM(str(path), dtype="float32", device="cpu", max_model_len=128)


def test_moe_routing_variants_match_hf(tmp_path, llm_check):
    """Top-k weights as the softmax left them (norm_topk_prob false), every second layer sparse."""
    path = build_tiny("qwen3_moe", tmp_path / "m", norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[],
                      num_experts_per_tok=3)
    want = hf_greedy(path, PROMPTS, 12)
    llm = LLM(str(path), dtype="float32", device="cpu")
    llm_check(llm)
    assert [type(layer.mlp).__name__ for layer in llm.engine.runner.model.layers] == ["MLP", "MoE", "MLP"]
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == want


HF_TO_GGUF = [  # the inverse of aengine.weights.GGUF_NAMES, for a tiny qwen3moe file
    (r"^model\.embed_tokens\.", "token_embd."), (r"^model\.norm\.", "output_norm."), (r"^lm_head\.", "output."),
    (r"^model\.layers\.(\d+)\.", r"blk.\1."), (r"input_layernorm", "attn_norm"),
    (r"post_attention_layernorm", "ffn_norm"), (r"self_attn\.(q|k)_norm", r"attn_\1_norm"),
    (r"self_attn\.o_proj", "attn_output"), (r"self_attn\.(q|k|v)_proj", r"attn_\1"),
    (r"mlp\.gate\.", "ffn_gate_inp."), (r"mlp\.(gate|up|down)_proj", r"ffn_\1"),
]


def write_qwen3moe_gguf(hf_dir, out):
    """A tiny HF Qwen3-MoE as llama.cpp writes it (f32; experts stacked per layer), with the
    embedded model's tokenizer."""
    import re

    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from aengine.weights import default_gguf

    c = AutoConfig.from_pretrained(hf_dir)
    w = gguf.GGUFWriter(str(out), "qwen3moe")
    w.add_name("tiny qwen3 moe")
    for key, val in [("context_length", c.max_position_embeddings), ("block_count", c.num_hidden_layers),
                     ("embedding_length", c.hidden_size), ("feed_forward_length", c.intermediate_size),
                     ("expert_feed_forward_length", c.moe_intermediate_size), ("head_count", c.num_attention_heads),
                     ("head_count_kv", c.num_key_value_heads), ("key_length", c.head_dim),
                     ("value_length", c.head_dim), ("layer_norm_rms_eps", c.rms_norm_eps),
                     ("rope_freq_base", c.rope_parameters["rope_theta"]), ("expert_count", c.num_experts),
                     ("expert_used_count", c.num_experts_per_tok)]:
        getattr(w, f"add_{key}")(val)
    for f in gguf.GGUFReader(default_gguf()).fields.values():
        if f.name.startswith("tokenizer."):
            w.add_key_value(f.name, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for name, t in sorted(load_file(str(hf_dir / "model.safetensors")).items()):
        if m := re.match(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)_proj\.weight$", name):
            experts.setdefault(f"blk.{m[1]}.ffn_{m[3]}_exps.weight", {})[int(m[2])] = t
            continue
        for pat, rep in HF_TO_GGUF:
            name = re.sub(pat, rep, name)
        w.add_tensor(name, t.float().numpy())
    for name, per in experts.items():
        w.add_tensor(name, torch.stack([per[e] for e in sorted(per)]).float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_qwen3moe_gguf_matches_hf(tmp_path, llm_check, monkeypatch):
    """A qwen3moe GGUF (experts stacked [E, I, H] per layer): our conversion against transformers
    loading the same file."""
    import transformers as tf

    monkeypatch.setenv("AENGINE_CACHE", str(tmp_path / "cache"))
    # 768: transformers' GGUF config leaves moe_intermediate_size at that default (ours reads the file);
    # every layer sparse: llama.cpp's qwen3moe has no dense layers (mlp_only_layers)
    hf_dir = build_tiny("qwen3_moe", tmp_path / "hf", vocab_size=49152, moe_intermediate_size=768,
                        mlp_only_layers=[])
    g = tmp_path / "g" / "tiny-qwen3moe.gguf"
    g.parent.mkdir()
    write_qwen3moe_gguf(hf_dir, g)
    model = tf.AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32)
    llm = LLM(str(g), dtype="float32", device="cpu")
    llm_check(llm)
    assert llm.engine.runner.hf.moe_intermediate_size == 768 and llm.engine.runner.hf.norm_topk_prob
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    for p, out in zip(PROMPTS, outs):
        ids = torch.tensor([p])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        assert out.token_ids == ref[0, len(p):].tolist()
