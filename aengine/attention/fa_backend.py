"""FlashAttention on the paged pool: flash-attn-4's `flash_attn.cute` (Hopper and newer), else the
classic `flash_attn`. Both read the pool's K/V as they are, with our page table's rows by slot."""

import torch

from aengine.attention.base import FP8_REFUSED, AttentionBackend, ForwardBatch
from aengine.cache.pool import KVPool


class FlashAttnBackend(AttentionBackend):
    fused_store = True

    def __init__(self, pool: KVPool, page_table: torch.Tensor, num_heads: int, **kw: object) -> None:
        if pool.fp8:
            raise ValueError(FP8_REFUSED)
        super().__init__(pool, page_table, num_heads)
        try:
            from flash_attn.cute import flash_attn_varlen_func

            self.cute = True
        except ImportError:
            from flash_attn import flash_attn_varlen_func  # classic FA2: page_size a multiple of 256

            self.cute = False
        self.attn = flash_attn_varlen_func
        # FA4 launches from host-side shapes only, so its decode can be captured; FA2's
        # cu_seqlens_k / max_seqlen_k change every step
        self.supports_graph = self.cute

    def prepare(self, fb: ForwardBatch) -> None:
        super().prepare(fb)
        self.pt = self.page_table[fb.slots.long()]
        self.max_q = max(fb.extend_lens_cpu)
        self.max_k: int | None = max(fb.seq_lens_cpu)
        if not self.cute:
            self.cu_k = torch.nn.functional.pad(fb.seq_lens.cumsum(0, dtype=torch.int32), (1, 0))

    def attend(self, q: torch.Tensor, layer: int, out: torch.Tensor | None = None) -> torch.Tensor:
        fb, kc, vc, q = self.fb, self.pool.k[layer], self.pool.v[layer], q.contiguous()
        if self.cute:
            o = self.attn(q, kc, vc, cu_seqlens_q=fb.qo_indptr, seqused_k=fb.seq_lens,
                          max_seqlen_q=self.max_q, max_seqlen_k=self.max_k, page_table=self.pt, causal=True)
        else:
            o = self.attn(q, kc, vc, fb.qo_indptr, self.cu_k, self.max_q, self.max_k, causal=True,
                          block_table=self.pt)
        o = o[0] if isinstance(o, tuple) else o
        return o if out is None else out.copy_(o)  # (a copy: flash-attn has no out= here)

    def init_graph(self, max_bs: int) -> None:
        self.g_pt = torch.zeros(max_bs, self.page_table.shape[1], dtype=torch.int32, device=self.page_table.device)

    def prepare_graph(self, fb: ForwardBatch) -> None:
        super().prepare(fb)
        bs = fb.batch_size
        self.g_pt[:bs] = self.page_table[fb.slots.long()]
        # the captured launch must serve every later step: bound lengths by the page-table row and the step's rows
        self.pt, self.max_q, self.max_k = self.g_pt[:bs], 1 if fb.decode else len(fb.input_ids), None
