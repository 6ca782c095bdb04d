"""Rotary position embedding (HF Llama/Qwen's rotate-half layout) with the default, linear and llama3 scalings."""

import math

import torch
from torch import nn

from aengine.layers.fused import fused


def rope_params(cfg: object) -> tuple[float, dict]:
    """(theta, scaling dict) from an HF config of transformers 4 (rope_theta/rope_scaling) or 5 (rope_parameters)."""
    rp = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    return float(rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))), rp


def _inv_freq(dim: int, theta: float, rp: dict) -> torch.Tensor:
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind == "linear":
        inv = inv / rp["factor"]
    elif kind == "llama3":
        factor, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
        old = rp["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif kind not in ("default", None):
        raise ValueError(f"unsupported rope scaling {kind!r}")
    return inv


_tables: dict[tuple, torch.Tensor] = {}


def _cos_sin(head_dim: int, max_pos: int, theta: float, rp: dict, device: torch.device) -> torch.Tensor:
    """cos | sin halves side by side (one gather per step for both); one table shared by all layers."""
    key = (head_dim, max_pos, theta, repr(sorted(rp.items())), str(device))
    if key not in _tables:
        freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), _inv_freq(head_dim, theta, rp))
        _tables[key] = torch.cat([freqs.cos(), freqs.sin()], -1).float().to(device)
    return _tables[key]


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_pos: int, theta: float, rp: dict) -> None:
        super().__init__()
        self.cos_sin = _cos_sin(head_dim, max_pos, theta, rp, torch.empty(0).device)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if (fi := fused(q)) is not None:  # in place, on the q/k views of the fused projection: no copies
            fi.rope.apply_rope_with_cos_sin_cache_inplace(positions, q, k, q.shape[-1], self.cos_sin, True)
            return q, k
        cos, sin = self.cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)  # [T, 1, D/2]
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)
