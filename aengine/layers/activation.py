"""SiLU-and-mul: the gated activation of Llama/Qwen MLPs on a fused gate_up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aengine.layers.fused import fused


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    fi = fused(x)
    if fi is not None:
        return fi.activation.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
