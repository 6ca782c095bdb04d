"""Paged decode attention in Triton, for a model-dtype pool: one program per (sequence, KV head, stretch of the
context) streams 64-token tiles of K and V, its query heads packed into one tensor-core tile. Each context is
split into stretches (about 4,096 programs in all), merged after. 0.92x the time of flashinfer's decode kernel,
which holds 8 tokens per program in flight, in W1's decode steps (RESULTS.md). No plan: it reads the page table."""

import torch
import triton
import triton.language as tl


@triton.jit
def _attention_part(Q, K, V, Table, Slots, Seq, Part, Lse, scale, table_stride, splits,
                    PS: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT: tl.constexpr):
    b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_ctx, slot = tl.load(Seq + b), tl.load(Slots + b).to(tl.int64)
    per = tl.cdiv(tl.cdiv(n_ctx, splits), BLOCK_N) * BLOCK_N
    lo = s * per
    hi = tl.minimum(lo + per, n_ctx)
    rows, d = tl.arange(0, BLOCK_H), tl.arange(0, D)
    head = h * GROUP + rows  # query heads of this KV head; rows past GROUP are padding for tl.dot's 16 rows
    q = tl.load(Q + (b * KV_HEADS * GROUP + head)[:, None] * D + d[None, :], mask=(rows < GROUP)[:, None], other=0.0)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    t = lo + tl.arange(0, BLOCK_N)
    page = tl.load(Table + slot * table_stride + t // PS, mask=t < hi, other=0).to(tl.int64)
    for n in range(lo, hi, BLOCK_N):
        t = n + tl.arange(0, BLOCK_N)
        ok = t < hi
        at = ((page * PS + t % PS) * KV_HEADS + h)[:, None] * D + d[None, :]
        k = tl.load(K + at, mask=ok[:, None], other=0.0)  # K, V and the next tile's page ids in flight together
        v = tl.load(V + at, mask=ok[:, None], other=0.0)  # (as fast as loading the ids at the top: RESULTS.md)
        t_next = t + BLOCK_N
        page = tl.load(Table + slot * table_stride + t_next // PS, mask=t_next < hi, other=0).to(tl.int64)
        x = tl.where(ok[None, :], tl.dot(q, tl.trans(k)) * scale, float("-inf"))  # scale folds in log2(e)
        m_new = tl.maximum(m, tl.max(x, 1))
        p = tl.exp2(x - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        den = den * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    keep = rows < GROUP
    at = (b * KV_HEADS * GROUP + head) * splits + s
    some = den > 0  # an empty stretch (a short sequence) has no mass: log-sum -inf, its output ignored
    o = acc / tl.where(some, den, 1.0)[:, None]
    if DIRECT:  # one stretch: the output itself, no merge
        tl.store(Part + at[:, None] * D + d[None, :], o.to(Part.dtype.element_ty), mask=keep[:, None])
    else:
        tl.store(Part + at[:, None] * D + d[None, :], o, mask=keep[:, None])
        tl.store(Lse + at, tl.where(some, m + tl.log2(tl.where(some, den, 1.0)), float("-inf")), mask=keep)


@triton.jit
def _attention_merge(Part, Lse, Out, splits, D: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)  # sequence * query heads + head
    s, d = tl.arange(0, BLOCK_S), tl.arange(0, D)
    lse = tl.load(Lse + row * splits + s, mask=s < splits, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))
    w = tl.where(lse > float("-inf"), w, 0.0)
    part = tl.load(Part + (row * splits + s)[:, None] * D + d[None, :], mask=(s < splits)[:, None], other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.maximum(tl.sum(w, 0), 1e-30)
    tl.store(Out + row * D + d, out.to(Out.dtype.element_ty))


def num_splits(batch: int, kv_heads: int, target: int = 4096, most: int = 16) -> int:
    """Stretches per sequence, for about `target` programs: W1 ran 3 % faster with 4,096 than with 512 (one
    stretch from batch 64 up, which microbenchmarks of equal lengths favour; RESULTS.md)."""
    return max(1, min(most, -(-target // (batch * kv_heads))))


def decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, slots: torch.Tensor,
           seq_lens: torch.Tensor, splits: int, out: torch.Tensor | None = None, block_n: int = 64,
           warps: int = 4, stages: int = 2) -> torch.Tensor:
    """q [B, heads, D] over pool pages k, v [pages, page_size, kv_heads, D]: sequence i's token t sits at page
    table[slots[i], t // page_size]; seq_lens [B] int32. Launch-only (no host sync): CUDA graphs capture it."""
    b, heads, dim = q.shape
    ps, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    out = torch.empty_like(q) if out is None else out
    part, lse = out, out
    if splits > 1:
        part = torch.empty(b, heads, splits, dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, heads, splits, dtype=torch.float32, device=q.device)
    _attention_part[(b, kv_heads, splits)](
        q, k, v, table, slots, seq_lens, part, lse, dim**-0.5 * 1.4426950408889634, table.stride(0), splits,
        PS=ps, KV_HEADS=kv_heads, GROUP=group, D=dim, BLOCK_H=triton.next_power_of_2(max(16, group)),
        BLOCK_N=block_n, DIRECT=splits == 1, num_warps=warps, num_stages=stages)
    if splits > 1:
        _attention_merge[(b * heads,)](part, lse, out, splits, D=dim, BLOCK_S=triton.next_power_of_2(splits))
    return out
