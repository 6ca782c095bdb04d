"""The paged KV pool: per layer, K and V as [num_pages, page_size, kv_heads, head_dim]."""

from __future__ import annotations

import torch


class KVPool:
    def __init__(
        self, num_layers: int, num_pages: int, page_size: int, kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device,
    ) -> None:
        self.num_pages, self.page_size = num_pages, page_size
        shape = (num_layers, num_pages, page_size, kv_heads, head_dim)
        # Zeroed on the GPU (a memset, cheap): kernels that load a whole page tile must not meet
        # NaN/Inf bit patterns in its unwritten slots. On the CPU only written slots are read, and
        # zeroing gigabytes there costs seconds at start-up.
        alloc = torch.zeros if torch.device(device).type == "cuda" else torch.empty
        self.k = alloc(shape, dtype=dtype, device=device)
        self.v = alloc(shape, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def store(self, layer: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        kc, vc = self.flat(layer)
        kc[loc] = k.to(kc.dtype)
        vc[loc] = v.to(vc.dtype)

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[num_pages * page_size, kv_heads, head_dim] views of one layer."""
        k, v = self.k[layer], self.v[layer]
        return k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])
