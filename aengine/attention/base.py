"""The attention backend interface, and the forward context layers read it from (not threaded through each layer)."""

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from aengine.cache.pool import KVPool

# flash-attn reads FP8 K/V only with FP8 queries (FA3's descale path), not bf16 q over an FP8 cache
FP8_REFUSED = "--kv-cache-dtype fp8_e4m3 needs --attn fi or torch: the fa backend cannot read an FP8 KV cache"


@dataclass
class ForwardBatch:
    """One step's tensors, on the model's device, plus the host-side lengths backends plan with."""

    decode: bool
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    out_loc: torch.Tensor  # [T] flat KV slot (page * page_size + offset) of each new token
    slots: torch.Tensor  # [B] request slot: the row of the page table
    seq_lens: torch.Tensor  # [B] tokens in KV after this step
    qo_indptr: torch.Tensor  # [B+1] where each sequence's new tokens start in the flat batch
    sample_idx: torch.Tensor  # [S] rows of the flat batch whose next token is sampled
    seq_lens_cpu: list[int]
    extend_lens_cpu: list[int]

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)


class AttentionBackend:
    """Writes each layer's new K/V into the paged pool and attends over the cached context."""

    supports_graph = False  # steps can be captured in CUDA graphs (see runtime/cuda_graph.py)
    # the model may write K/V into the pool itself, fused with norm and rotary (layers/qkv_store.py),
    # and call attend(); the torch backend stays unfused: the reference the fused path is tested against
    fused_store = False

    def __init__(self, pool: KVPool, page_table: torch.Tensor, num_heads: int, **_: object) -> None:
        self.pool, self.page_table, self.num_heads = pool, page_table, num_heads

    def prepare(self, fb: ForwardBatch) -> None:
        """Plan once per step; every layer then reuses the plan."""
        self.fb = fb

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        """Store this step's k, v in the pool, then attend."""
        self.pool.store(layer, self.fb.out_loc, k, v)
        return self.attend(q, layer)

    def attend(self, q: torch.Tensor, layer: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """q [T, heads, head_dim] over the pool, this step's K/V already stored; into out when it is given."""
        raise NotImplementedError

    def init_graph(self, max_bs: int) -> None:
        """Allocate the fixed buffers that captured graphs (decode and prefill) read their metadata from."""
        raise NotImplementedError

    def prepare_graph(self, fb: ForwardBatch) -> None:
        """Plan a padded step at fixed addresses, before capture and each replay: captured kernels read it."""
        raise NotImplementedError


# Per thread: engines in one process (tests, an LLM beside a server) run their forwards in their own
# worker threads, and an overlapped step may still be running when another engine starts one.
_local = threading.local()


def current() -> AttentionBackend:
    return _local.stack[-1]


@contextlib.contextmanager
def forward_context(backend: AttentionBackend) -> Iterator[None]:
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(backend)
    try:
        yield
    finally:
        stack.pop()
