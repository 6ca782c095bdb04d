"""Reference attention in plain torch: gather each sequence's K/V from its pages (dequantized if FP8), SDPA
with a causal mask offset by the cached prefix. Slow and obviously right."""

import torch
import torch.nn.functional as F

from aengine.attention.base import AttentionBackend, ForwardBatch


class TorchBackend(AttentionBackend):
    def prepare(self, fb: ForwardBatch) -> None:
        super().prepare(fb)
        ps = self.pool.page_size
        self.kv_idx: list[torch.Tensor] = []
        offs = torch.arange(ps, device=fb.slots.device)
        for i, n in enumerate(fb.seq_lens_cpu):
            pages = self.page_table[fb.slots[i], : (n + ps - 1) // ps].long()
            self.kv_idx.append((pages[:, None] * ps + offs).flatten()[:n])
        self.qo = fb.qo_indptr.tolist()

    def attend(self, q: torch.Tensor, layer: int, out: torch.Tensor | None = None) -> torch.Tensor:
        fb, out = self.fb, torch.empty_like(q) if out is None else out
        group = q.shape[1] // self.pool.k.shape[-2]
        for i, n in enumerate(fb.seq_lens_cpu):
            s, e = self.qo[i], self.qo[i + 1]
            qi = q[s:e].transpose(0, 1)  # [H, q, D]
            kv = self.pool.read(layer, self.kv_idx[i], q.dtype)
            ki, vi = (t.transpose(0, 1).repeat_interleave(group, 0) for t in kv)
            # query j sits at absolute position n - (e - s) + j and sees keys up to it
            ar = torch.arange(n, device=q.device)
            mask = ar[None, :] <= ar[n - (e - s) :, None]
            out[s:e] = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask).transpose(0, 1)
        return out
