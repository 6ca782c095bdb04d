"""Linear layers sharded for tensor parallelism; each parameter knows how to load its shard."""

import torch
import torch.nn.functional as F
from torch import nn

from aengine.distributed import all_reduce, tp


def _shard(w: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    n = w.shape[dim] // size
    return w.narrow(dim, rank * n, n)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's output rows split over ranks; several HF weights may be fused into one
    (gate+up, q+k+v): `out_sizes` lists each part's full size, and `shard_id` names the part."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False) -> None:
        super().__init__()
        size = tp().size
        assert all(o % size == 0 for o in out_sizes), f"{out_sizes} not divisible by tp={size}"
        self.out_sizes = [o // size for o in out_sizes]
        self.offsets = [sum(self.out_sizes[:i]) for i in range(len(out_sizes))]
        self.weight = nn.Parameter(torch.empty(sum(self.out_sizes), in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(sum(self.out_sizes)), requires_grad=False) if bias else None

    def load(self, name: str, w: torch.Tensor, shard_id: int = 0) -> None:
        param = self.weight if name == "weight" else self.bias
        param.data.narrow(0, self.offsets[shard_id], self.out_sizes[shard_id]).copy_(self.shard_part(w, shard_id))

    def shard_part(self, w: torch.Tensor, shard_id: int) -> torch.Tensor:
        return _shard(w, 0, tp().rank, tp().size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused; heads split over ranks, KV heads replicated when fewer than the ranks."""

    def __init__(self, hidden: int, head_dim: int, n_heads: int, n_kv_heads: int, bias: bool) -> None:
        size = tp().size  # checked against the heads before any rank started (tp/launch.py:check_tp)
        self.n_kv_local = max(1, n_kv_heads // size)
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        kv = self.n_kv_local * head_dim * size  # so that the base class divides it evenly
        super().__init__(hidden, [n_heads * head_dim, kv, kv], bias)

    def shard_part(self, w: torch.Tensor, shard_id: int) -> torch.Tensor:
        if shard_id == 0:
            return _shard(w, 0, tp().rank, tp().size)
        # rank r serves KV head r * n_kv // size (replicated when size > n_kv)
        first = tp().rank * self.n_kv_heads // tp().size if tp().size > self.n_kv_heads else tp().rank * self.n_kv_local
        return w.narrow(0, first * self.head_dim, self.n_kv_local * self.head_dim)


class RowParallelLinear(nn.Module):
    """y = x W^T with W's input columns split over ranks; the partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        size = tp().size
        assert in_features % size == 0, f"{in_features} not divisible by tp={size}"
        self.weight = nn.Parameter(torch.empty(out_features, in_features // size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def load(self, name: str, w: torch.Tensor, shard_id: int = 0) -> None:
        if name == "weight":
            self.weight.data.copy_(_shard(w, 1, tp().rank, tp().size))
        else:
            self.bias.data.copy_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(F.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y
