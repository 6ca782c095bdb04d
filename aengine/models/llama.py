"""Llama-family decoder (Llama-3.x, SmolLM2, Mistral) over a flat token batch; Qwen2/Qwen3 switch on a qkv bias
or q/k norms, Qwen3-MoE expert MLPs in the layers its config makes sparse. HF weight names load directly."""

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from aengine.attention import current
from aengine.distributed import tp
from aengine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from aengine.layers.fused import silu_and_mul
from aengine.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from aengine.layers.moe import MoE
from aengine.layers.norm import RMSNorm
from aengine.layers.qkv_store import available as fused_qkv_available
from aengine.layers.qkv_store import qkv_norm_rope_store
from aengine.layers.rotary import RotaryEmbedding, rope_params


class Attention(nn.Module):
    def __init__(self, cfg: object, layer: int, qkv_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.layer = layer
        hidden, heads = cfg.hidden_size, cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", heads)
        self.head_dim = getattr(cfg, "head_dim", None) or hidden // heads
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, heads, kv_heads, qkv_bias)
        self.n_local, self.n_kv_local = heads // tp().size, self.qkv_proj.n_kv_local
        self.o_proj = RowParallelLinear(heads * self.head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.rotary = RotaryEmbedding(self.head_dim, cfg.max_position_embeddings, *rope_params(cfg))
        self.fusable = (half := self.head_dim // 2) & (half - 1) == 0  # the fused kernel tiles half a head: 2^n
        # FP8 KV cache scales (stored = k / k_scale): from the checkpoint when it ships them, else 1.0
        self.k_scale, self.v_scale = 1.0, 1.0

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        backend = current()
        if backend.fused_store and self.fusable and fused_qkv_available(qkv):
            pool = backend.pool
            q = qkv_norm_rope_store(qkv, positions, backend.fb.out_loc, self.rotary.cos_sin, self.n_local,
                                    self.n_kv_local, *pool.flat(self.layer), self.q_norm, self.k_norm,
                                    inv_scale=pool.inv_scales[self.layer] if pool.fp8 else None)
            o = backend.attend(q, self.layer)
        else:
            q, k, v = (t.view(-1, n, self.head_dim) for t, n in zip(qkv.split(self.qkv_proj.out_sizes, dim=-1),
                                                                    (self.n_local, self.n_kv_local, self.n_kv_local)))
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.rotary(positions, q, k)
            o = backend.forward(q, k, v, self.layer)
        return self.o_proj(o.reshape(o.shape[0], -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(hidden, [inter, inter])
        self.down_proj = RowParallelLinear(inter, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: object, layer: int, qkv_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer, qkv_bias, qk_norm)
        n = getattr(cfg, "num_experts", 0)  # Qwen3-MoE: sparse unless in mlp_only_layers or off the step
        if n and layer not in getattr(cfg, "mlp_only_layers", []) and (layer + 1) % cfg.decoder_sparse_step == 0:
            self.mlp = MoE(cfg.hidden_size, cfg.moe_intermediate_size, n, cfg.num_experts_per_tok, cfg.norm_topk_prob)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


# FP8 KV cache scales as checkpoints name them (docs/gpu.md, Scales); q_scale, prob_scale (FP8 attention) are skipped
KV_SCALE = re.compile(r"^layers\.(\d+)\.self_attn\.(?:attn\.|k_proj\.|v_proj\.)?"
                      r"(k_scale|v_scale|kv_scale|q_scale|prob_scale)$"
                      r"|^layers\.(\d+)\.self_attn\.(k|v)_proj\.output_scale$")
EXPERT = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.weight$")  # one expert of a MoE layer


class LlamaForCausalLM(nn.Module):
    qkv_bias = qk_norm = False  # Qwen2 / Qwen3 below turn one on
    # HF checkpoint name -> (our fused module, part)
    stacked = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
               "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, cfg: object) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        qkv_bias = getattr(cfg, "attention_bias", False) or self.qkv_bias
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, qkv_bias, self.qk_norm) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.tied = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        if self.tied:
            self.lm_head.weight = self.embed_tokens.weight

    def checkpoint_shapes(self, cfg: object) -> Iterator[tuple[str, tuple[int, ...]]]:
        """The tensors of transformers' model of cfg (its names; experts stacked as it stacks them): dummy
        weights are drawn under these names without building that model, whose imports take seconds."""
        h, v, heads = cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads
        kv, hd = getattr(cfg, "num_key_value_heads", heads), getattr(cfg, "head_dim", None) or h // heads
        bias = getattr(cfg, "attention_bias", False) or self.qkv_bias
        yield from [("model.embed_tokens.weight", (v, h)), ("model.norm.weight", (h,))] + \
            [("lm_head.weight", (v, h))] * (not getattr(cfg, "tie_word_embeddings", False))
        for i, layer in enumerate(self.layers):
            e, f = (cfg.num_experts, cfg.moe_intermediate_size) if isinstance(layer.mlp, MoE) else \
                (0, cfg.intermediate_size)
            t = [("input_layernorm.weight", (h,)), ("post_attention_layernorm.weight", (h,)),
                 ("self_attn.o_proj.weight", (h, heads * hd))] + [(f"self_attn.{n}_norm.weight", (hd,)) for n in "qk"
                                                                  if self.qk_norm]
            for n, rows in (("q", heads * hd), ("k", kv * hd), ("v", kv * hd)):
                t += [(f"self_attn.{n}_proj.weight", (rows, h))] + [(f"self_attn.{n}_proj.bias", (rows,))] * bool(bias)
            t += [("mlp.gate.weight", (e, h)), ("mlp.experts.gate_up_proj", (e, 2 * f, h)),
                  ("mlp.experts.down_proj", (e, h, f))] if e else \
                [("mlp.gate_proj.weight", (f, h)), ("mlp.up_proj.weight", (f, h)), ("mlp.down_proj.weight", (h, f))]
            yield from ((f"model.layers.{i}.{n}", shape) for n, shape in t)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        return self.norm(x, residual)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.logits(hidden)  # the model's dtype: the sampler widens only where it must

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        modules, params = dict(self.named_modules()), dict(self.named_parameters())
        self.kv_scales_loaded = 0  # how many k/v scale tensors the checkpoint had
        for name, w in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name or (self.tied and name == "lm_head.weight"):
                continue
            mod_name, _, kind = name.rpartition(".")
            parent, _, leaf = mod_name.rpartition(".")
            if m := KV_SCALE.match(name):
                self._load_kv_scale(int(m[1] or m[3]), m[2] or f"{m[4]}_scale", w)
            elif m := EXPERT.match(name):
                modules[m[1]].load(m[3], w, int(m[2]))
            elif leaf in self.stacked:
                target, shard = self.stacked[leaf]
                modules[f"{parent}.{target}"].load(kind, w, shard)
            elif hasattr(modules.get(mod_name), "load"):
                modules[mod_name].load(kind, w)
            elif name in params:
                params[name].data.copy_(w)
            else:
                raise ValueError(f"unexpected weight {name!r}")

    def _load_kv_scale(self, layer: int, kind: str, w: torch.Tensor) -> None:
        """One per-tensor scale; a per-head vector (some quantizers) collapses to its largest entry,
        which never saturates a head that its own scale would not."""
        if kind not in ("k_scale", "v_scale", "kv_scale"):
            return
        attn = self.layers[layer].self_attn
        s = float(w.float().max())
        if not s > 0 or s == float("inf"):
            raise ValueError(f"layer {layer}: {kind} {s} in the checkpoint is not a positive finite scale")
        attn.k_scale = s if kind != "v_scale" else attn.k_scale  # kv_scale sets both
        attn.v_scale = s if kind != "k_scale" else attn.v_scale
        self.kv_scales_loaded += 1


class Qwen2ForCausalLM(LlamaForCausalLM):  # Qwen2 / Qwen2.5: a bias on the q, k and v projections
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):  # Qwen3: RMSNorm on each head of q and k before rotary
    qk_norm = True
