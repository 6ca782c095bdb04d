"""Mixture-of-experts MLP (Qwen3-MoE): top-k softmax router, SwiGLU experts sliced by TP (docs/tp.md).
CUDA half precision: two grouped GEMMs, no host syncs (docs/gpu.md); elsewhere an expert loop, the reference."""

import functools

import torch
import torch.nn.functional as F
from torch import nn

from aengine.distributed import all_reduce, tp
from aengine.layers.fused import fused, silu_and_mul


@functools.cache
def _segment_gemm(device: torch.device) -> object:
    import flashinfer

    return flashinfer.SegmentGEMMWrapper(torch.empty(32 << 20, dtype=torch.uint8, device=device))


class Experts(nn.Module):
    """Every expert's gate+up [E, 2I, H] and down [E, H, I] weights (I: this rank's slice)."""

    def __init__(self, n_experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        size = tp().size
        assert inter % size == 0, f"expert size {inter} not divisible by tp={size}"
        self.n, self.inter = n_experts, inter // size
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * self.inter, hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, self.inter), requires_grad=False)

    def load(self, kind: str, w: torch.Tensor, expert: int | None = None) -> None:
        """One expert's gate_proj / up_proj / down_proj (checkpoints), or with expert None all
        experts' stacked (transformers' own names: gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
        sel, n, r = slice(None) if expert is None else expert, self.inter, tp().rank
        if kind == "down_proj":
            self.w2.data[sel] = w.narrow(-1, r * n, n)
            return
        parts = w.chunk(2, dim=-2) if kind == "gate_up_proj" else [w]
        for i, p in enumerate(parts, 1 if kind == "up_proj" else 0):
            self.w13.data[sel, i * n : (i + 1) * n] = p.narrow(-2, r * n, n)

    def forward(self, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], each token's expert ids and weights [T, k] -> the weighted sum [T, H]."""
        if fused(x) is not None:
            return self._grouped(x, w, ids)
        out = torch.zeros_like(x)
        for e in range(self.n):
            if x.is_cuda:  # every token, weighted 0 where unchosen: no host sync, so graphs can capture it
                tok, scale = slice(None), (w * (ids == e)).sum(-1, keepdim=True)
            else:
                tok, slot = (ids == e).nonzero(as_tuple=True)
                scale = w[tok, slot, None]
            out[tok] += F.linear(silu_and_mul(F.linear(x[tok], self.w13[e])), self.w2[e]) * scale
        return out

    def _grouped(self, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The (token, choice) rows sorted by expert; each expert's rows are one GEMM segment."""
        t, k = ids.shape
        flat = ids.flatten()
        order = flat.argsort(stable=True)
        experts = torch.arange(self.n + 1, device=x.device)
        indptr = torch.searchsorted(flat[order], experts)
        gemm, kw = _segment_gemm(x.device), dict(seg_indptr=indptr, weight_indices=experts[:-1])
        h = gemm.run(x[order // k], self.w13, self.n, True, **kw)
        y = gemm.run(silu_and_mul(h), self.w2, self.n, True, **kw)
        y = torch.empty_like(y).index_copy_(0, order, y)  # back to (token, choice) order
        return torch.bmm(w.unsqueeze(1), y.view(t, k, -1)).squeeze(1)


class MoE(nn.Module):
    def __init__(self, hidden: int, inter: int, n_experts: int, top_k: int, renorm: bool) -> None:
        super().__init__()
        self.top_k, self.renorm = top_k, renorm
        self.gate = nn.Linear(hidden, n_experts, bias=False)  # the router, whole on every rank
        self.experts = Experts(n_experts, hidden, inter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, ids = self.gate(x).float().softmax(-1).topk(self.top_k, dim=-1)
        if self.renorm:
            w = w / w.sum(-1, keepdim=True)
        return all_reduce(self.experts(x, w.to(x.dtype), ids))
