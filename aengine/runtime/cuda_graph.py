"""CUDA graphs over static buffers, padded rows writing to scratch page 0 (docs/gpu.md). Decode: one per batch-size
bucket; the ids come from the runner's last_tok on the device, so overlap scheduling keeps working. Prefill: one per
token-count bucket, at a fixed number of sequences (empty ones pad it), attention planned into fixed buffers."""

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


def prefill_buckets(max_tokens: int) -> list[int]:
    """Token counts: powers of two to 512, then every 256 (a padded step computes at most 256 rows more)."""
    return [n for n in (16, 32, 64, 128, 256, *range(512, max_tokens + 1, 256)) if n <= max_tokens]


class CudaGraphs:
    def __init__(self, model: nn.Module, backend: AttentionBackend, max_bs: int,
                 prefill_backend: AttentionBackend | None = None, max_tokens: int = 0) -> None:
        self.model, self.backend, self.max_bs = model, backend, max_bs
        self.graphs: dict[tuple[bool, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # (decode, rows, seqs)
        self.sizes: list[int] = []
        self.psizes: list[int] = []
        if not self.backend.supports_graph:
            log.info("CUDA graphs off: the %s decode backend cannot be captured", type(self.backend).__name__)
            return
        dev = next(model.parameters()).device
        i32, i64 = dict(dtype=torch.int32, device=dev), dict(dtype=torch.int64, device=dev)
        rows = max([max_bs, *(psizes := prefill_buckets(max_tokens))])  # ids, positions, locs: decode's and prefill's
        self.ids, self.slots, self.seq = torch.zeros(rows, **i32), torch.zeros(max_bs, **i32), torch.ones(max_bs, **i32)
        self.pos, self.loc = torch.zeros(rows, **i64), torch.zeros(rows, **i64)
        # decode's query offsets never change; a prefill step's are copied into pqo
        self.qo, self.pqo, self.sidx = torch.arange(max_bs + 1, **i32), torch.zeros(max_bs + 1, **i32), \
            torch.arange(max_bs, **i64)
        self.mempool = torch.cuda.graph_pool_handle()
        self.backend.init_graph(max_bs)
        try:
            self._capture(self.backend, True, buckets(max_bs))
        except Exception:  # a backend that cannot be captured must not take the engine down
            log.exception("CUDA graph capture failed; decode runs eagerly")
            self.graphs.clear()
        self.prefill_backend = prefill_backend or backend
        if psizes and self.graphs and self.prefill_backend.supports_graph:
            if self.prefill_backend is not self.backend:
                self.prefill_backend.init_graph(max_bs)
            try:
                self._capture(self.prefill_backend, False, psizes)
            except Exception:
                log.exception("prefill CUDA graph capture failed; prefill runs eagerly")
                self.psizes = []

    def _fb(self, decode: bool, n: int, seq_lens: list[int], ext: list[int]) -> ForwardBatch:
        """n rows over len(seq_lens) sequences, in the static buffers."""
        b = len(seq_lens)
        return ForwardBatch(decode, self.ids[:n], self.pos[:n], self.loc[:n], self.slots[:b], self.seq[:b],
                            (self.qo if decode else self.pqo)[: b + 1], self.sidx[:b], seq_lens, ext)

    def _levels(self, decode: bool, n: int) -> list[int]:
        """Sequences in the graphs of n rows: one per row in decode. Prefill: up to 4 or up to max_bs, the last ones
        empty (flashinfer's plan walks every sequence in Python: +3.5 ms at 256; most steps fit the small one)."""
        return [n] if decode else sorted({min(n, 4), min(n, self.max_bs)})

    @torch.inference_mode()
    def _capture(self, backend: AttentionBackend, decode: bool, sizes: list[int]) -> None:
        model, pool, t0 = self.model, self.mempool, time.perf_counter()
        # largest first: the smaller graphs then fit in the memory pool the largest left behind
        for i, (n, b) in enumerate([(m, b) for m in reversed(sizes) for b in reversed(self._levels(decode, m))]):
            # captured with every row in the first sequence, each over one page (the page table may be narrow)
            fb = self._fb(decode, n, [1] * b, [1] * b if decode else [n - b + 1] + [1] * (b - 1))
            if not decode:
                self.pqo[: b + 1] = torch.tensor([0, *range(n - b + 1, n + 1)])
            backend.prepare_graph(fb)
            with forward_context(backend):
                if i == 0 or (decode and n < 16):  # warm-up outside the graph (lazy inits; Triton's variants)
                    model(fb.input_ids, fb.positions)
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    out = model(fb.input_ids, fb.positions)
            self.graphs[decode, n, b] = g, out
        if decode:
            self.sizes = sizes
        else:
            self.psizes = sizes
        log.info("captured %d CUDA graphs for %s up to %d in %.1f s", sum(len(self._levels(decode, n)) for n in sizes),
                 "decode batches" if decode else "prefill steps of tokens", sizes[-1], time.perf_counter() - t0)

    def release(self) -> None:
        """Free the graphs: NCCL's teardown blocks while graphs that captured its collectives live (pytorch#115388)."""
        for g, _ in self.graphs.values():
            g.reset()
        self.graphs, self.sizes, self.psizes = {}, [], []

    def can_run(self, fb: ForwardBatch) -> bool:
        sizes, n = (self.sizes, fb.batch_size) if fb.decode else (self.psizes, len(fb.input_ids))
        return bool(sizes) and n <= sizes[-1] and fb.batch_size <= self.max_bs

    def run(self, fb: ForwardBatch) -> torch.Tensor:
        """The final hidden states of fb's rows."""
        d, t, b = fb.decode, len(fb.input_ids), fb.batch_size
        n = (sizes := self.sizes if d else self.psizes)[bisect.bisect_left(sizes, t)]
        rows = next(r for r in self._levels(d, n) if r >= b)
        for buf, src in zip((self.ids, self.pos, self.loc, self.slots, self.seq),
                            (fb.input_ids, fb.positions, fb.out_loc, fb.slots, fb.seq_lens)):
            buf[: len(src)].copy_(src)
        if n > t:  # stale rows of an earlier, larger step must not write into live pages
            for buf in (self.ids, self.pos, self.loc):
                buf[t:n].zero_()
        if pad := rows - b:  # padding sequences read page 0
            self.slots[b:rows].zero_()
            self.seq[b:rows].fill_(1)
        if not d:  # padding sequences are empty: their query rows start and end at t
            self.pqo[: b + 1].copy_(fb.qo_indptr)
            self.pqo[b + 1 : rows + 1].fill_(t)
        backend = self.backend if d else self.prefill_backend
        backend.prepare_graph(self._fb(d, n, [*fb.seq_lens_cpu] + [1] * pad, [*fb.extend_lens_cpu] + [int(d)] * pad))
        graph, out = self.graphs[d, n, rows]
        graph.replay()
        return out[:t]
