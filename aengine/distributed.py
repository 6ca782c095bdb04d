"""Tensor-parallel state: this process's rank and the group it all-reduces over."""

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class TPState:
    rank: int = 0
    size: int = 1
    group: object | None = None


_tp = TPState()


def tp() -> TPState:
    return _tp


def set_tp(rank: int, size: int, group: object | None = None) -> None:
    _tp.rank, _tp.size, _tp.group = rank, size, group


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _tp.size > 1:
        dist.all_reduce(x, group=_tp.group)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    if _tp.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_tp.size)]
    dist.all_gather(parts, x.contiguous(), group=_tp.group)
    return torch.cat(parts, dim=-1)


def broadcast_from_first(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's values on every rank: sampled ids, so all ranks feed the same next token even if sampling differs."""
    if _tp.size > 1 and x.numel():
        dist.broadcast(x, src=0, group=_tp.group)  # the TP group is the whole world: rank 0 is global 0
    return x
