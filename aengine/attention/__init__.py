"""Attention backends on the paged KV cache. `torch` is the reference every fast one is tested against."""

from __future__ import annotations

from aengine.attention.base import AttentionBackend, ForwardBatch, current, forward_context


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


__all__ = ["AttentionBackend", "ForwardBatch", "create_backend", "current", "forward_context"]
