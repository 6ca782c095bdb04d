"""flashinfer's fused kernels for half-precision CUDA tensors, or None: callers fall back to torch (fp32, the
reference); and SiLU-and-mul. AENGINE_NO_FUSED=1 turns them off (to measure or rule them out)."""

import os
from types import ModuleType

import torch
import torch.nn.functional as F

_fi: ModuleType | bool | None = None


def flashinfer() -> ModuleType | None:
    global _fi
    if _fi is None:
        try:
            import flashinfer as fi

            _fi = fi if not os.environ.get("AENGINE_NO_FUSED") else False
        except ImportError:
            _fi = False
    return _fi or None


def fused(x: torch.Tensor) -> ModuleType | None:
    """flashinfer when x is a CUDA half-precision tensor and flashinfer is installed."""
    return flashinfer() if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) else None


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """The gated activation of Llama/Qwen MLPs on a fused gate_up projection."""
    if (fi := fused(x)) is not None:
        return fi.activation.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
