"""CUDA graphs for decode: one per batch-size bucket over static buffers, padded rows writing to scratch page 0
(docs/gpu.md); the ids come from the runner's last_tok on the device, so overlap scheduling keeps working."""

from __future__ import annotations

import bisect
import logging
import time

import torch
from torch import nn

from aengine.attention import AttentionBackend, ForwardBatch, forward_context

log = logging.getLogger("aengine")


def buckets(max_bs: int) -> list[int]:
    """Small sizes exactly, then every 16: at most 15 padded rows at a large batch."""
    return sorted({b for b in (1, 2, 4, 8, *range(16, max_bs + 1, 16)) if b <= max_bs} | {max_bs})


class CudaGraphs:
    def __init__(self, model: nn.Module, backend: AttentionBackend, max_bs: int) -> None:
        self.model, self.backend = model, backend
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.out: dict[int, torch.Tensor] = {}
        self.sizes: list[int] = []
        if not self.backend.supports_graph:
            log.info("CUDA graphs off: the %s decode backend cannot be captured", type(self.backend).__name__)
            return
        dev = next(model.parameters()).device
        i32, i64 = dict(dtype=torch.int32, device=dev), dict(dtype=torch.int64, device=dev)
        self.ids, self.slots = torch.zeros(max_bs, **i32), torch.zeros(max_bs, **i32)
        self.pos, self.loc = torch.zeros(max_bs, **i64), torch.zeros(max_bs, **i64)
        self.seq = torch.ones(max_bs, **i32)
        self.qo = torch.arange(max_bs + 1, **i32)
        self.sidx = torch.arange(max_bs, **i64)
        self.backend.init_graph(max_bs)
        try:
            self._capture(buckets(max_bs))
        except Exception:  # a backend that cannot be captured must not take the engine down
            log.exception("CUDA graph capture failed; decode runs eagerly")
            self.graphs.clear()
            self.out.clear()

    def _fb(self, n: int, seq_lens: list[int]) -> ForwardBatch:
        return ForwardBatch(True, self.ids[:n], self.pos[:n], self.loc[:n], self.slots[:n], self.seq[:n],
                            self.qo[: n + 1], self.sidx[:n], seq_lens, [1] * n)

    @torch.inference_mode()
    def _capture(self, sizes: list[int]) -> None:
        model, pool, t0 = self.model, torch.cuda.graph_pool_handle(), time.perf_counter()
        # largest first: the smaller graphs then fit in the memory pool the largest left behind
        for n in reversed(sizes):
            fb = self._fb(n, [1] * n)
            self.backend.prepare_graph(fb)
            with forward_context(self.backend):
                if n == sizes[-1] or n < 16:  # warm-up outside the graph (lazy inits; Triton's variants by n % 16)
                    model(fb.input_ids, fb.positions)
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    self.out[n] = model(fb.input_ids, fb.positions)
            self.graphs[n] = g
        self.sizes = sizes
        log.info("captured %d CUDA graphs for decode batches up to %d in %.1f s", len(sizes), sizes[-1],
                 time.perf_counter() - t0)

    def release(self) -> None:
        """Free the graphs: NCCL's teardown blocks while graphs that captured its collectives live (pytorch#115388)."""
        for g in self.graphs.values():
            g.reset()
        self.graphs.clear()
        self.out.clear()
        self.sizes = []

    def can_run(self, fb: ForwardBatch) -> bool:
        return bool(self.sizes) and fb.decode and fb.batch_size <= self.sizes[-1]

    def run(self, fb: ForwardBatch) -> torch.Tensor:
        """The final hidden states of fb's rows."""
        b = fb.batch_size
        n = self.sizes[bisect.bisect_left(self.sizes, b)]
        for buf, src in zip((self.ids, self.pos, self.loc, self.slots, self.seq),
                            (fb.input_ids, fb.positions, fb.out_loc, fb.slots, fb.seq_lens)):
            buf[:b].copy_(src)
        if n > b:  # stale rows of an earlier, larger step must not write into live pages
            for buf in (self.ids, self.pos, self.loc, self.slots):
                buf[b:n].zero_()
            self.seq[b:n].fill_(1)
        self.backend.prepare_graph(self._fb(n, list(fb.seq_lens_cpu) + [1] * (n - b)))
        self.graphs[n].replay()
        return self.out[n][:b]
