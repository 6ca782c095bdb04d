"""One Triton kernel from the QKV projection to attention: q/k RMSNorm (Qwen3), rotary, and the KV pool
write (quantized as cache/pool.py:quantize for FP8). Why and what it needs: docs/gpu.md. CUDA half only."""

import os

import torch

from aengine.layers.norm import RMSNorm

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install has no Triton; nothing here runs there
    triton = None


def available(x: torch.Tensor) -> bool:
    return (triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and not os.environ.get("AENGINE_NO_FUSED"))


if triton is not None:

    @triton.jit
    def _heads(src, dst, stride_dst, cos, sin, w_ptr, eps, inv_ptr, NH: tl.constexpr, BH: tl.constexpr,
               HALF: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr, QUANT: tl.constexpr):
        """NH heads of 2*HALF values at src -> dst (head h at dst + h * stride_dst); QUANT: dst is
        float8_e4m3fn and takes x * (1 / scale), saturated."""
        h = tl.arange(0, BH)[:, None]
        d = tl.arange(0, HALF)[None, :]
        mask = h < NH
        x1 = tl.load(src + h * 2 * HALF + d, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + h * 2 * HALF + HALF + d, mask=mask, other=0.0).to(tl.float32)
        if NORM:  # rows normalised in fp32, rounded once to the model dtype, as flashinfer's RMSNorm does
            r = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
            w1 = tl.load(w_ptr + d).to(tl.float32)
            w2 = tl.load(w_ptr + HALF + d).to(tl.float32)
            x1 = (x1 * r * w1).to(src.dtype.element_ty).to(tl.float32)
            x2 = (x2 * r * w2).to(src.dtype.element_ty).to(tl.float32)
        if ROPE:  # rotate-half (HF Llama/Qwen) layout
            x1, x2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        if QUANT:  # what cache/pool.py:quantize does: scale, saturate at +-448, round to nearest even
            inv = tl.load(inv_ptr)
            x1 = tl.minimum(tl.maximum(x1 * inv, -448.0), 448.0)
            x2 = tl.minimum(tl.maximum(x2 * inv, -448.0), 448.0)
        tl.store(dst + h * stride_dst + d, x1.to(dst.dtype.element_ty), mask=mask)
        tl.store(dst + h * stride_dst + HALF + d, x2.to(dst.dtype.element_ty), mask=mask)

    @triton.jit
    def _qkv_kernel(qkv, stride_t, pos_ptr, loc_ptr, cos_sin, qw, kw, eps, q_out, k_cache, v_cache, inv_scale,
                    NQ: tl.constexpr, NKV: tl.constexpr, BQ: tl.constexpr, BKV: tl.constexpr,
                    HALF: tl.constexpr, NORM: tl.constexpr, QUANT: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        loc = tl.load(loc_ptr + t).to(tl.int64)
        d = tl.arange(0, HALF)[None, :]
        cos = tl.load(cos_sin + pos * 2 * HALF + d)
        sin = tl.load(cos_sin + pos * 2 * HALF + HALF + d)
        src = qkv + t * stride_t
        D: tl.constexpr = 2 * HALF
        _heads(src, q_out + t * NQ * D, D, cos, sin, qw, eps, inv_scale, NQ, BQ, HALF, NORM, True, False)
        _heads(src + NQ * D, k_cache + loc * NKV * D, D, cos, sin, kw, eps, inv_scale, NKV, BKV, HALF, NORM, True,
               QUANT)
        _heads(src + (NQ + NKV) * D, v_cache + loc * NKV * D, D, cos, sin, kw, eps, inv_scale + 1, NKV, BKV, HALF,
               False, False, QUANT)


def qkv_norm_rope_store(qkv: torch.Tensor, positions: torch.Tensor, out_loc: torch.Tensor, cos_sin: torch.Tensor,
                        n_q: int, n_kv: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None,
                        inv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """qkv [T, (n_q + 2 n_kv) * head_dim] -> q [T, n_q, head_dim], normalised (with the norms) and
    rotated; k (normalised, rotated) and v go to rows out_loc of the flat caches [slots, n_kv, head_dim].
    FP8 caches need inv_scale, a float32 device tensor [1/k_scale, 1/v_scale] (KVPool.inv_scales[layer])."""
    t, d = qkv.shape[0], k_cache.shape[-1]
    q = torch.empty(t, n_q, d, dtype=qkv.dtype, device=qkv.device)
    if t == 0:
        return q
    quant = k_cache.dtype == torch.float8_e4m3fn
    if quant and (inv_scale is None or inv_scale.dtype != torch.float32 or inv_scale.numel() != 2):
        raise ValueError("an FP8 KV cache needs inv_scale: a float32 tensor [1/k_scale, 1/v_scale]")
    qw, kw = (q_norm.weight, k_norm.weight) if q_norm is not None else (qkv, qkv)  # unread without norms
    _qkv_kernel[(t,)](qkv, qkv.stride(0), positions, out_loc, cos_sin, qw, kw, q_norm.eps if q_norm else 0.0,
                      q, k_cache, v_cache, inv_scale.contiguous() if quant else cos_sin, NQ=n_q, NKV=n_kv,
                      BQ=triton.next_power_of_2(n_q), BKV=triton.next_power_of_2(n_kv), HALF=d // 2,
                      NORM=q_norm is not None, QUANT=quant, num_warps=4)
    return q
