"""RMSNorm, optionally fused with the residual add that precedes it."""

import torch
from torch import nn

from aengine.layers.fused import fused


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if (fi := fused(x)) is not None:
            shape = x.shape  # q/k norms see [tokens, heads, head_dim]; the kernel wants rows
            return fi.norm.rmsnorm(x.reshape(-1, shape[-1]), self.weight, self.eps).view(shape)
        y = x.float()
        return self.weight * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def forward(self, x: torch.Tensor,
                residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._norm(x)
        if (fi := fused(x)) is not None:
            # one kernel for the add and the norm; it updates x and residual in place, which is
            # safe here: the decoder layers hand over fresh tensors and never reuse them
            fi.norm.fused_add_rmsnorm(x, residual, self.weight, self.eps)
            return x, residual
        x = x + residual
        return self._norm(x), x
