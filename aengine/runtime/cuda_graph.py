"""CUDA graphs. Decode: one per batch-size bucket over static buffers, padded rows writing to scratch page 0
(docs/gpu.md); the ids come from the runner's last_tok on the device, so overlap scheduling keeps working.
Prefill: piecewise, one graph per stretch between two attentions per token-count bucket; attention (whose
plan depends on every sequence's length) runs eagerly between the replays."""

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


class _Split(AttentionBackend):
    """The backend while a prefill step is captured: each attention copies q to a static buffer, ends the graph
    being captured, begins the next and returns the static buffer that the eager attention fills at replay."""

    def __init__(self, inner: AttentionBackend, fb: ForwardBatch, q: torch.Tensor, o: torch.Tensor) -> None:
        super().__init__(inner.pool, inner.page_table, inner.num_heads)
        self.fused_store, self.fb, self.q, self.o = inner.fused_store, fb, q, o
        self.pieces: list[tuple[torch.cuda.CUDAGraph, int | None]] = []
        self.graph: torch.cuda.CUDAGraph | None = None  # None: a warm-up pass, nothing captured

    def begin(self, mempool: object) -> None:
        self.mempool, self.graph = mempool, torch.cuda.CUDAGraph()
        self.graph.capture_begin(pool=mempool)

    def end(self, layer: int | None) -> None:
        self.graph.capture_end()
        self.pieces.append((self.graph, layer))

    def attend(self, q: torch.Tensor, layer: int, out: torch.Tensor | None = None) -> torch.Tensor:
        self.q[: len(q)].copy_(q)
        if self.graph is not None:  # capturing: this piece ends at layer's attention, the next begins
            self.end(layer)
            self.begin(self.mempool)
        return self.o[: len(q)]


class CudaGraphs:
    def __init__(self, model: nn.Module, backend: AttentionBackend, max_bs: int,
                 prefill_backend: AttentionBackend | None = None, max_tokens: int = 0) -> None:
        self.model, self.backend = model, backend
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # decode by batch size: graph, output
        self.sizes: list[int] = []
        self.pieces: dict[int, tuple[list, torch.Tensor]] = {}  # prefill by token bucket: (graph, layer)s, output
        self.psizes: list[int] = []
        if not self.backend.supports_graph:
            log.info("CUDA graphs off: the %s decode backend cannot be captured", type(self.backend).__name__)
            return
        dev = next(model.parameters()).device
        i32, i64 = dict(dtype=torch.int32, device=dev), dict(dtype=torch.int64, device=dev)
        rows = max([max_bs, *(psizes := prefill_buckets(max_tokens))])  # ids, positions, locs: decode's and prefill's
        self.ids, self.slots, self.seq = torch.zeros(rows, **i32), torch.zeros(max_bs, **i32), torch.ones(max_bs, **i32)
        self.pos, self.loc = torch.zeros(rows, **i64), torch.zeros(rows, **i64)
        self.qo, self.sidx = torch.arange(max_bs + 1, **i32), torch.arange(max_bs, **i64)
        self.backend.init_graph(max_bs)
        self.mempool = torch.cuda.graph_pool_handle()
        try:
            self._capture(buckets(max_bs))
        except Exception:  # a backend that cannot be captured must not take the engine down
            log.exception("CUDA graph capture failed; decode runs eagerly")
            self.graphs.clear()
        # the torch backend stores K/V itself: it stays the eager reference
        if prefill_backend is not None and prefill_backend.fused_store and psizes:
            self.prefill_backend = prefill_backend
            try:
                self._capture_prefill(psizes)
            except Exception:
                log.exception("prefill CUDA graph capture failed; prefill runs eagerly")
                self.pieces.clear()

    def _fb(self, n: int, seq_lens: list[int]) -> ForwardBatch:
        return ForwardBatch(True, self.ids[:n], self.pos[:n], self.loc[:n], self.slots[:n], self.seq[:n],
                            self.qo[: n + 1], self.sidx[:n], seq_lens, [1] * n)

    @torch.inference_mode()
    def _capture(self, sizes: list[int]) -> None:
        model, pool, t0 = self.model, self.mempool, time.perf_counter()
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
                    out = model(fb.input_ids, fb.positions)
            self.graphs[n] = g, out
        self.sizes = sizes
        log.info("captured %d CUDA graphs for decode batches up to %d in %.1f s", len(sizes), sizes[-1],
                 time.perf_counter() - t0)

    @torch.inference_mode()
    def _capture_prefill(self, sizes: list[int]) -> None:
        t0, attn, w = time.perf_counter(), self.model.layers[0].self_attn, self.model.embed_tokens.weight
        # one q and one attention output buffer serve every layer: layer i's are read before i+1 writes them
        self.q, self.o = (w.new_zeros(sizes[-1], attn.n_local, attn.head_dim) for _ in "qo")
        stream = torch.cuda.Stream(w.device)  # graphs cannot be captured on the default stream
        for n in reversed(sizes):
            fb = ForwardBatch(False, self.ids[:n], self.pos[:n], self.loc[:n], self.slots[:1], self.seq[:1],
                              self.qo[:2], self.sidx[:1], [n], [n])
            split = _Split(self.prefill_backend, fb, self.q, self.o)
            with forward_context(split):
                if n == sizes[-1]:  # warm-up outside the graphs
                    self.model(fb.input_ids, fb.positions)
                torch.cuda.synchronize()
                with torch.cuda.stream(stream):
                    split.begin(self.mempool)
                    try:  # a failed capture must still end, or every later launch fails
                        out = self.model(fb.input_ids, fb.positions)
                    finally:
                        split.end(None)
            self.pieces[n] = split.pieces, out
        self.psizes = sizes
        log.info("captured prefill CUDA graphs for %d step sizes up to %d tokens, %d pieces each, in %.1f s",
                 len(sizes), sizes[-1], len(self.pieces[sizes[-1]][0]), time.perf_counter() - t0)

    def prefill(self, fb: ForwardBatch) -> torch.Tensor:
        """The final hidden states of a prefill (or mixed) step: the pieces replayed, attention eager between them."""
        t = len(fb.input_ids)
        n = self.psizes[bisect.bisect_left(self.psizes, t)]
        for buf, src in zip((self.ids, self.pos, self.loc), (fb.input_ids, fb.positions, fb.out_loc)):
            buf[:t].copy_(src)
        self.loc[t:n].zero_()  # padded rows write to scratch page 0; their stale ids and positions are valid
        self.prefill_backend.prepare(fb)
        pieces, out = self.pieces[n]
        for graph, layer in pieces:
            graph.replay()
            if layer is not None:
                self.prefill_backend.attend(self.q[:t], layer, out=self.o[:t])
        return out[:t]

    def release(self) -> None:
        """Free the graphs: NCCL's teardown blocks while graphs that captured its collectives live (pytorch#115388)."""
        for g in [*(g for g, _ in self.graphs.values()), *(g for p, _ in self.pieces.values() for g, _ in p)]:
            g.reset()
        self.graphs, self.pieces, self.sizes, self.psizes = {}, {}, [], []

    def can_run(self, fb: ForwardBatch) -> bool:
        sizes, n = (self.sizes, fb.batch_size) if fb.decode else (self.psizes, len(fb.input_ids))
        return bool(sizes) and n <= sizes[-1]

    def run(self, fb: ForwardBatch) -> torch.Tensor:
        """The final hidden states of fb's rows."""
        if not fb.decode:
            return self.prefill(fb)
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
        graph, out = self.graphs[n]
        graph.replay()
        return out[:b]
