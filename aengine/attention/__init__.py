"""Attention backends on the paged KV cache. `torch` is the reference every fast one is tested against."""

import torch

from aengine.attention.base import FP8_REFUSED, AttentionBackend, ForwardBatch, current, forward_context


def check_kv_dtype(names: tuple[str, ...], dtype: torch.dtype) -> None:
    """Refuse, in one line, a backend that cannot read the KV cache's dtype (at start-up)."""
    if dtype == torch.float8_e4m3fn and "fa" in names:  # unknown names: create_backend says
        raise ValueError(FP8_REFUSED)


def default_page(names: tuple[str, ...], kv_dtype: torch.dtype, device: torch.device) -> int:
    """--page-size 0: fa's kernels want 128; fi decodes FP8 on Hopper with XQA (pages of 16..128); else 1."""
    xqa = kv_dtype == torch.float8_e4m3fn and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
    return 128 if "fa" in names else 64 if "fi" in names and xqa else 1


def create_backend(name: str, **kw: object) -> AttentionBackend:
    if name == "torch":
        from aengine.attention.torch_backend import TorchBackend as cls
    elif name == "fi":
        from aengine.attention.flashinfer_backend import FlashInferBackend as cls
    elif name == "fa":
        from aengine.attention.fa_backend import FlashAttnBackend as cls
    else:
        raise ValueError(f"unknown attention backend {name!r} (torch, fi, fa)")
    return cls(**kw)


__all__ = ["AttentionBackend", "ForwardBatch", "check_kv_dtype", "create_backend", "current", "forward_context"]
