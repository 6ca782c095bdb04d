"""Vocab-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary."""

import torch
import torch.nn.functional as F
from torch import nn

from aengine.distributed import all_gather_last_dim, all_reduce, tp


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.vocab, self.per_rank = vocab, -(-vocab // tp().size)
        self.start = tp().rank * self.per_rank
        self.weight = nn.Parameter(torch.zeros(self.per_rank, dim), requires_grad=False)

    def load(self, name: str, w: torch.Tensor, shard_id: int = 0) -> None:
        part = w[self.start : self.start + self.per_rank]
        self.weight.data[: part.shape[0]].copy_(part)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if tp().size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mask = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(mask, 0), self.weight)
        out.masked_fill_(mask.unsqueeze(-1), 0)
        return all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return all_gather_last_dim(F.linear(h, self.weight))[..., : self.vocab]
