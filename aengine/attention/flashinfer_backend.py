"""FlashInfer paged attention: prefill and decode wrappers planned once per step for every layer, one per
graph bucket; the pool is flashinfer's "NHD" layout as it is. FP8 KV and XQA decode: docs/gpu.md."""

import numpy as np
import torch

from aengine.attention.base import AttentionBackend, ForwardBatch
from aengine.attention.triton_decode import decode as split_decode
from aengine.attention.triton_decode import num_splits
from aengine.cache.pool import KVPool

WORKSPACE_BYTES = 256 << 20  # split-k partial results; flashinfer recommends 128 MB and up
XQA_PAGE_SIZES = (16, 32, 64, 128)
XQA_WORKSPACE_BYTES = 64 << 20  # its own, zeroed: its first 8 MB are semaphores that must start at 0


class FlashInferBackend(AttentionBackend):
    supports_graph = True
    fused_store = True

    def __init__(self, pool: KVPool, page_table: torch.Tensor, num_heads: int, **kw: object) -> None:
        super().__init__(pool, page_table, num_heads)
        import flashinfer

        self.fi = flashinfer
        self.device = pool.k.device
        self.kv_heads, self.head_dim = pool.k.shape[-2], pool.k.shape[-1]
        # queries (and outputs) in the model dtype; the pool's dtype is the model's unless it is FP8
        self.q_dtype = kw.get("q_dtype") or (torch.bfloat16 if pool.fp8 else pool.k.dtype)
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        # tensor-core decode (the prefill kernel with one query row) wins once a KV head serves
        # 4+ query heads; below that the CUDA-core decode kernel is as fast
        self.tensor_cores = num_heads // self.kv_heads >= 4
        # "auto": fa3 on sm90, 0.69x fa2's time on W2's prefill step (attn_bench.py --prefill); FP8 K/V needs fa2
        self.prefill_w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, "NHD", backend="fa2" if pool.fp8 else "auto")
        self.decode_w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=self.tensor_cores)
        self.graph_w: dict[tuple[bool, int, int], object] = {}
        self.wrapper: object = self.decode_w
        self.planned: torch.cuda.Event | None = None
        hopper = torch.cuda.get_device_capability(self.device)[0] == 9
        self.xqa = pool.fp8 and pool.page_size in XQA_PAGE_SIZES and hopper
        # a model-dtype pool decodes with our split-KV Triton kernel, 0.92x flashinfer's time, no plan (docs/gpu.md)
        self.split = not pool.fp8 and self.head_dim & (self.head_dim - 1) == 0  # tl.arange needs powers of 2
        if self.xqa:
            self.xqa_ws = torch.zeros(XQA_WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)

    def _pages(self, fb: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Host (pinned) qo_indptr, kv_indptr, last_page_len, and the device list of page ids."""
        ps, b = self.pool.page_size, fb.batch_size
        seq = np.asarray(fb.seq_lens_cpu, dtype=np.int64)
        npages = (seq + ps - 1) // ps
        kv_indptr = np.concatenate([[0], np.cumsum(npages)])
        qo_indptr = np.concatenate([[0], np.cumsum(fb.extend_lens_cpu)])
        last = seq - (npages - 1) * ps
        host = torch.from_numpy(np.concatenate([qo_indptr, kv_indptr, last, npages]).astype(np.int32)).pin_memory()
        dev = host.to(self.device, non_blocking=True)
        counts, starts = dev[3 * b + 2 :], dev[b + 1 : 2 * b + 1]
        total = int(kv_indptr[-1])
        # each sequence's page ids back to back, gathered from the page table on the device
        # (repeat_interleave with output_size never syncs with the host)
        row = torch.repeat_interleave(counts, output_size=total)
        col = torch.arange(total, device=self.device, dtype=torch.int32) - starts[row]
        indices = self.page_table[fb.slots.long()[row], col.long()]
        return host[: b + 1], host[b + 1 : 2 * b + 2], host[2 * b + 2 : 3 * b + 2], indices

    def _plan(self, wrapper: object, fb: ForwardBatch) -> None:
        qo, kv_indptr, last, indices = self._pages(fb)
        # plan copies its schedule up from a pinned buffer asynchronously; with overlap the previous step's
        # copy may still be queued: let it drain first (it almost always has: the step before was awaited)
        if self.planned is not None:
            self.planned.synchronize()
        dt = dict(q_data_type=self.q_dtype, kv_data_type=self.pool.k.dtype)
        if fb.decode:
            wrapper.plan(kv_indptr, indices, last, self.num_heads, self.kv_heads, self.head_dim,
                         self.pool.page_size, **dt)
        else:  # 512+ new tokens fill the GPU unsplit, and a split's merge kernel took as long as attention (RESULTS.md)
            # and a captured step never splits: whether fa2 splits depends on lengths, and a graph holds one launch
            wrapper.plan(qo, kv_indptr, indices, last, self.num_heads, self.kv_heads, self.head_dim,
                         self.pool.page_size, causal=True,
                         disable_split_kv=int(qo[-1]) >= 512 or wrapper.is_cuda_graph_enabled, **dt)
        self.planned = torch.cuda.Event()
        self.planned.record()
        self.wrapper = wrapper

    def prepare(self, fb: ForwardBatch) -> None:
        super().prepare(fb)
        if fb.decode and self.split:
            self.splits = num_splits(fb.batch_size, self.kv_heads)
        elif not (fb.decode and self.xqa):
            self._plan(self.decode_w if fb.decode else self.prefill_w, fb)

    def attend(self, q: torch.Tensor, layer: int, out: torch.Tensor | None = None) -> torch.Tensor:
        kv = (self.pool.k[layer], self.pool.v[layer])
        if self.fb.decode and self.split:
            return split_decode(q.contiguous(), *kv, self.page_table, self.fb.slots, self.fb.seq_lens, self.splits,
                                out=out)
        if self.fb.decode and self.xqa:
            if layer == 0:  # once per step, inside the forward (and so inside a captured graph)
                self.table = self.page_table[self.fb.slots.long()]
                self.seq_u32 = self.fb.seq_lens.to(torch.int32).view(torch.uint32)
            return self.fi.decode.xqa_batch_decode_with_kv_cache(
                q.contiguous(), kv, self.xqa_ws, self.table, self.seq_u32, self.table.shape[1] * self.pool.page_size,
                bmm1_scale=self.pool.k_scale[layer] * self.head_dim**-0.5, bmm2_scale=self.pool.v_scale[layer])
        scales = dict(k_scale=self.pool.k_scale[layer], v_scale=self.pool.v_scale[layer]) if self.pool.fp8 else {}
        return self.wrapper.run(q.contiguous(), kv, out=out, **scales)  # without out: a fresh torch.zeros

    def init_graph(self, max_bs: int) -> None:
        i32 = dict(dtype=torch.int32, device=self.device)
        self.g_qo, self.g_indptr, self.g_last = (torch.zeros(max_bs + 1, **i32) for _ in range(3))
        # shared pages (radix cache) may appear in several rows: bound by full rows, not the pool
        self.g_indices = torch.zeros(max_bs * self.page_table.shape[1], **i32)

    def prepare_graph(self, fb: ForwardBatch) -> None:
        if fb.decode and (self.split or self.xqa):  # nothing to plan: the captured step reads the page table itself
            return self.prepare(fb)
        super().prepare(fb)
        bs, key = fb.batch_size, (fb.decode, len(fb.input_ids), fb.batch_size)
        if key not in self.graph_w:  # one wrapper per graph: its plan must repeat the captured launch's shape
            buf = self.g_indptr[: bs + 1], self.g_indices, self.g_last[:bs]
            self.graph_w[key] = self.fi.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", True, self.tensor_cores, *buf) if fb.decode else \
                self.fi.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", True, self.g_qo[: bs + 1], *buf,
                                                            backend="fa2" if self.pool.fp8 else "auto")
        self._plan(self.graph_w[key], fb)
