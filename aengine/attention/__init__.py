"""Attention backends on the paged KV cache. `torch` is the reference every fast one is tested against."""

from __future__ import annotations

import torch

from aengine.attention.base import AttentionBackend, ForwardBatch, current, forward_context

FP8_KV = ("torch", "fi")  # backends that read a float8 KV cache


def check_kv_dtype(names: tuple[str, ...], dtype: torch.dtype) -> None:
    """Refuse, in one line, a backend that cannot read the KV cache's dtype (at start-up)."""
    bad = sorted({n for n in names if n not in FP8_KV and n in ("fa",)})  # unknown names: create_backend says
    if dtype == torch.float8_e4m3fn and bad:
        raise ValueError(f"--kv-cache-dtype fp8_e4m3 needs --attn fi or torch: the {'/'.join(bad)} backend "
                         "cannot read an FP8 KV cache")


def create_backend(name: str, **kw: object) -> AttentionBackend:
    if name == "torch":
        from aengine.attention.torch_backend import TorchBackend

        return TorchBackend(**kw)
    if name == "fi":
        from aengine.attention.flashinfer_backend import FlashInferBackend

        return FlashInferBackend(**kw)
    if name == "fa":
        from aengine.attention.fa_backend import FlashAttnBackend

        return FlashAttnBackend(**kw)
    raise ValueError(f"unknown attention backend {name!r} (torch, fi, fa)")


__all__ = ["AttentionBackend", "ForwardBatch", "check_kv_dtype", "create_backend", "current", "forward_context"]
