"""Paged decode attention, one layer's call, on W1's decode shape (Qwen3-0.6B: 16 query heads, 8 KV heads,
head dim 128, bf16) through flashinfer's kernels, to choose the engine's decode kernel and page size.
Each cell: GPU µs (median), KV bandwidth (B*L*kv_heads*head_dim*2*2 bytes), and the relative error vs the
CUDA-core page-16 output on the same data (that cell itself: vs an fp32 torch computation); plan() host µs too.
  python benchmarks/attn_bench.py [--fa3] [--json attn.jsonl]  # ~1 min on an H200 after JIT compiles (fa3: ~80 s)
`--splits 128,256` adds tensor-core decode with KV split into that many tokens per CTA (flashinfer's
fixed_split_size): at batch 212, 1,696 CTAs (212 x 8 KV heads) may leave the last wave of CTAs part-full.
`--triton` instead compares aengine's split-KV Triton decode (aengine/attention/triton_decode.py) with flashinfer's
CUDA-core decode, as the engine plans it, on fixed and W1-like varied context lengths, over tile/warp/stage choices.
`--prefill` instead times causal prefill steps as the engine plans them (page 1, no cached prefix, split KV off
from 512 tokens): fa2 against fa3, the prefill kernel of aengine/attention/flashinfer_backend.py.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as python3 benchmarks/attn_bench.py

import torch  # noqa: E402

from benchmarks.common import emit_json, machine  # noqa: E402

QO_HEADS, KV_HEADS, HEAD_DIM, DTYPE = 16, 8, 128, torch.bfloat16
LAYERS = 28  # one plan per step serves every layer: the per-step estimate is plan + 28 runs
WORKSPACE_BYTES = 256 << 20  # what aengine/attention/flashinfer_backend.py gives flashinfer
POOLS, MIN_POOL_BYTES = 4, 256 << 20  # runs rotate over 4 K+V pools of >= 5x the 50 MB L2: no run reads from cache
WARMUP, PLAN_REPS = 10, 20


def ints(s: str) -> list[int]:
    return [int(x) for x in s.replace("/", ",").split(",")]  # "/" too: the device script turns commas into spaces


def exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """fp32 attention, one query per sequence; query head h reads KV head h // group, as in flashinfer."""
    b, _, h, d = k.shape
    s = torch.einsum("bhgd,blhd->bhgl", q.float().view(b, h, -1, d), k.float()) * d**-0.5
    return torch.einsum("bhgl,blhd->bhgd", s.softmax(-1), v.float()).reshape(b, -1, d)


def layout(k_tok: torch.Tensor, v_tok: torch.Tensor, ps: int, g: torch.Generator, kv_dt: torch.dtype) -> dict[str, Any]:
    """The same tokens in a pool of page size ps, each sequence's pages at random ids (a used pool's are
    scattered, and locality would flatter the kernels); host indptr/last_page_len pinned, ids on the device."""
    b, L, dev = k_tok.shape[0], k_tok.shape[1], k_tok.device
    npg = -(-L // ps)
    pages = max(b * npg, MIN_POOL_BYTES // (ps * KV_HEADS * HEAD_DIM * kv_dt.itemsize * 2))
    ids = torch.randperm(pages, device=dev, generator=g)[: b * npg].to(torch.int32)
    pos = torch.arange(L, device=dev)
    slots = (ids.view(b, npg)[:, pos // ps].long() * ps + pos % ps).view(-1)
    # written through a byte view: scatter into FP8 tensors is not in every torch build
    flat = torch.zeros(2, pages * ps, KV_HEADS, HEAD_DIM, dtype=kv_dt, device=dev).view(torch.uint8)
    flat[:, slots] = torch.stack((k_tok, v_tok)).view(2, -1, KV_HEADS, HEAD_DIM).to(kv_dt).view(torch.uint8)
    flat = flat.view(kv_dt)
    k, v = flat.view(2, pages, ps, KV_HEADS, HEAD_DIM).unbind()  # flashinfer "NHD", the engine's pool layout
    pin = dict(dtype=torch.int32, pin_memory=True)
    indptr, last = torch.arange(0, (b + 1) * npg, npg, **pin), torch.full((b,), L - (npg - 1) * ps, **pin)
    return {"pools": [(k, v)] + [(k.clone(), v.clone()) for _ in range(POOLS - 1)],
            "plan": (indptr, ids, last, QO_HEADS, KV_HEADS, HEAD_DIM, ps), "qo": torch.arange(b + 1, **pin),
            "table": ids.view(b, npg), "seq": torch.full((b,), L, dtype=torch.int32, device=dev).view(torch.uint32)}


class Xqa:
    """flashinfer's XQA decode (TensorRT-LLM's; sm90 runs FP8 KV on tensor cores): no plan, a block
    table [B, pages] and uint32 lengths; `plan` only binds this layout's table to the next runs."""

    def __init__(self, fi: Any, dev: torch.device) -> None:
        self.fi, self.ws = fi, torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=dev)  # zeroed: semaphores

    def plan(self, lay: dict) -> None:
        self.table, self.seq = lay["table"], lay["seq"]

    def run(self, q: torch.Tensor, kv: tuple) -> torch.Tensor:
        return self.fi.decode.xqa_batch_decode_with_kv_cache(
            q, kv, self.ws, self.table, self.seq, self.table.shape[1] * kv[0].shape[1], bmm1_scale=HEAD_DIM**-0.5)


def host_us(fn: Any) -> float:
    fn()  # the first call loads (or JIT-compiles) the kernel module: not a per-step cost
    ts = []
    for _ in range(PLAN_REPS):
        torch.cuda.synchronize()  # the previous plan's async upload of its schedule must land before we overwrite it
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    return statistics.median(ts) * 1e6


def gpu_us(w: Any, q: torch.Tensor, pools: list, reps: int) -> float:
    for i in range(WARMUP):
        w.run(q, pools[i % POOLS])
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    # the GPU sleeps while Python queues every rep, so the events time the kernels, not launch overhead
    torch.cuda._sleep(reps * 1_000_000)
    for i, (a, z) in enumerate(ev):
        a.record()
        w.run(q, pools[i % POOLS])
        z.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(z) for a, z in ev) * 1e3


# (name, query heads, prompt lengths of one step): W2's TTFT step (Llama-3.1-8B), a W4 arrival and a W1 prefill
# step (Qwen3-0.6B, W1's mean prompt of 562 tokens)
PREFILL_STEPS = [("w2-1024", 32, [1024]), ("w4-1013", 16, [562, 451]), ("w1-7868", 16, [562] * 14)]


def prefill_bench(fi: Any, ws: torch.Tensor, kinds: list[str], reps: int, dest: str | None) -> None:
    dev, info = torch.device("cuda"), {"bench": "attn_prefill", "flashinfer": fi.__version__, **machine()}
    print(f"causal prefill, page 1, one layer, {KV_HEADS} kv heads x {HEAD_DIM} bf16: GPU µs (median of {reps}),"
          f" rel err vs fa2")
    for name, heads, lens in PREFILL_STEPS:
        t, g = sum(lens), torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(t, heads, HEAD_DIM, dtype=DTYPE, device=dev, generator=g)
        pages = max(t, MIN_POOL_BYTES // (KV_HEADS * HEAD_DIM * 4))
        pools = [tuple(torch.randn(pages, 1, KV_HEADS, HEAD_DIM, dtype=DTYPE, device=dev, generator=g) for _ in "kv")
                 for _ in range(POOLS)]
        ids = torch.randperm(pages, device=dev, generator=g)[:t].to(torch.int32)  # a used pool's pages: scattered
        pin = dict(dtype=torch.int32, pin_memory=True)
        indptr = torch.tensor([0, *itertools.accumulate(lens)], **pin)
        cells, ref = [], None
        for kind in kinds:
            w = fi.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend=kind)
            w.plan(indptr, indptr, ids, torch.ones(len(lens), **pin), heads, KV_HEADS, HEAD_DIM, 1, causal=True,
                   disable_split_kv=t >= 512, q_data_type=DTYPE, kv_data_type=DTYPE)
            out = w.run(q, pools[0]).float()
            ref = out if ref is None else ref
            us, err = gpu_us(w, q, pools, reps), ((out - ref).norm() / ref.norm()).item()
            emit_json({"step": name, "tokens": t, "qo_heads": heads, "kernel": kind, "us": us, "rel_err": err,
                       **info}, dest)
            cells.append(f"{kind} {us:7.1f} µs ({err:.1e})")
        print(f"{name:>8} ({t:,} tokens, {heads} q heads): " + " | ".join(cells))


# (name, query heads, context lengths): W1's decode shapes (16 q heads), at two steps of its run with its varied
# lengths (prompt randint(100, 1024) + the step), and W2's (Llama-3.1-8B: 32 q heads, batch 1)
def triton_shapes() -> list[tuple[str, int, list[int]]]:
    import random
    r = random.Random(0)
    return [("64x800", 16, [800] * 64), ("128x800", 16, [800] * 128), ("212x800", 16, [800] * 212),
            ("256x1500", 16, [1500] * 256), ("w1-step225", 16, [r.randint(100, 1024) + 225 for _ in range(212)]),
            ("w1-step600", 16, [r.randint(100, 1024) + 600 for _ in range(96)]), ("w2-640", 32, [640])]


class Run:
    """attn_bench's timing loop calls run(q, (k, v)); this binds everything else."""

    def __init__(self, fn: Any) -> None:
        self.run = fn


def triton_bench(fi: Any, ws: torch.Tensor, reps: int, dest: str | None) -> None:
    from aengine.attention import triton_decode as td
    dev, info = torch.device("cuda"), {"bench": "attn_triton", "flashinfer": fi.__version__, **machine()}
    variants = [(bn, 4, st) for bn in (64, 128) for st in (1, 2)]
    for name, heads, lens in triton_shapes():
        b, total, g = len(lens), sum(lens), torch.Generator(device=dev).manual_seed(0)
        pages = max(total, MIN_POOL_BYTES // (KV_HEADS * HEAD_DIM * 4))
        pools = [tuple(torch.randn(pages, 1, KV_HEADS, HEAD_DIM, dtype=DTYPE, device=dev, generator=g) for _ in "kv")
                 for _ in range(POOLS)]
        ids = torch.randperm(pages, device=dev, generator=g)[:total].to(torch.int32)
        table = torch.zeros(b + 1, max(lens), dtype=torch.int32, device=dev)  # row 0 unused, as the engine's scratch
        starts = [0, *itertools.accumulate(lens)]
        for i, n in enumerate(lens):
            table[i + 1, :n] = ids[starts[i]: starts[i + 1]]
        slots = torch.arange(1, b + 1, dtype=torch.int32, device=dev)
        seq = torch.tensor(lens, dtype=torch.int32, device=dev)
        q = torch.randn(b, heads, HEAD_DIM, dtype=DTYPE, device=dev, generator=g)
        pin = dict(dtype=torch.int32, pin_memory=True)
        w = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=heads // KV_HEADS >= 4)
        w.plan(torch.tensor(starts, **pin), ids, torch.ones(b, **pin), heads, KV_HEADS, HEAD_DIM, 1,
               q_data_type=DTYPE, kv_data_type=DTYPE)
        ref = w.run(q, pools[0]).float()
        gb = total * KV_HEADS * HEAD_DIM * 4 / 1e9
        base = gpu_us(w, q, pools, reps)
        cells = [("flashinfer", base, 0.0)]
        for sp in sorted({1, 2, 3, 4, 6, 8, td.num_splits(b, KV_HEADS)}):
            for bn, wp, st in variants:
                r = Run(lambda q, kv, kw=dict(table=table, slots=slots, seq_lens=seq, splits=sp, block_n=bn, warps=wp,
                        stages=st): td.decode(q, kv[0], kv[1], **kw))
                out = r.run(q, pools[0]).float()
                cells.append((f"s{sp}/n{bn}/w{wp}/st{st}", gpu_us(r, q, pools, reps),
                              ((out - ref).norm() / ref.norm()).item()))
        for kind, us, err in cells:
            emit_json({"shape": name, "batch": b, "qo_heads": heads, "kv_tokens": total, "kernel": kind, "us": us,
                       "tb_per_s": gb / us * 1e3, "rel_err": err, **info}, dest)
        best = sorted(cells[1:], key=lambda c: c[1])[:4]
        print(f"{name:>11} (B {b}, {heads} q heads, {gb:.2f} GB): flashinfer {base:6.1f} µs {gb / base * 1e3:.2f} TB/s"
              " | " + " | ".join(f"{k} {us:6.1f} µs {gb / us * 1e3:.2f} TB/s ({e:.0e})" for k, us, e in best))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=ints, default=[64, 128, 212, 256], help="batch sizes B")
    ap.add_argument("--ctx", type=int, default=800, help="every sequence's context length L")
    ap.add_argument("--long", type=int, default=1500, help="one more row at the largest B with this L (0: none)")
    ap.add_argument("--page-sizes", type=ints, default=[1, 16, 64, 256])
    ap.add_argument("--reps", type=int, default=50, help="timed runs per variant (the median is reported)")
    ap.add_argument("--fa3", action="store_true", help="also the sm90 prefill kernel (compiles ~80 s on first use)")
    ap.add_argument("--kv-dtype", default="bf16", choices=["bf16", "fp8"], help="the pool's dtype (fp8: e4m3, scale 1)")
    ap.add_argument("--json", default=None, help="append one JSON line per variant to this file ('-': stdout)")
    ap.add_argument("--prefill", action="store_true", help="causal prefill steps, fa2 against fa3, instead of decode")
    ap.add_argument("--triton", action="store_true", help="aengine's Triton split-KV decode against flashinfer's")
    ap.add_argument("--splits", type=ints, default=[], help="also tensor-core decode with split KV of this many tokens "
                    "per split (fixed_split_size): whether splitting beats a partial last wave of CTAs")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("attn_bench: needs a CUDA GPU, and torch sees none", file=sys.stderr)
        sys.exit(2)
    import flashinfer as fi
    dev = torch.device("cuda")
    ws = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=dev)  # shared, as the engine's wrappers share it
    if args.prefill:
        return prefill_bench(fi, ws, ["fa2", "fa3"], args.reps, args.json)
    if args.triton:
        return triton_bench(fi, ws, args.reps, args.json)
    wrappers = {"cuda": fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=False),
                "tc": fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True),
                "fa2": fi.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend="fa2")}
    if torch.cuda.get_device_capability()[0] == 9:
        wrappers["xqa"] = Xqa(fi, dev)
    kv_dt = torch.float8_e4m3fn if args.kv_dtype == "fp8" else DTYPE
    for t in args.splits:
        wrappers[f"tc/s{t}"] = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
    if args.fa3 and args.kv_dtype != "fp8":  # flashinfer's fa3 reads FP8 KV only with FP8 queries
        wrappers["fa3"] = fi.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend="fa3")
    sizes = sorted(args.page_sizes, key=lambda p: p != 16)  # the reference page size (16, else the first) first
    shapes = [(b, args.ctx) for b in args.batch] + ([(max(args.batch), args.long)] if args.long else [])
    info = {"bench": "attn_decode", "qo_heads": QO_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
            "dtype": "bfloat16", "kv_dtype": str(kv_dt).removeprefix("torch."), "flashinfer": fi.__version__,
            "reps": args.reps, **machine()}
    rows: list[dict] = []
    for b, L in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        k_tok, v_tok = (torch.randn(b, L, KV_HEADS, HEAD_DIM, dtype=DTYPE, device=dev, generator=g) for _ in "kv")
        q = torch.randn(b, QO_HEADS, HEAD_DIM, dtype=DTYPE, device=dev, generator=g)
        if args.kv_dtype == "fp8":  # the reference sees what the pool holds
            k_tok, v_tok = k_tok.to(kv_dt).to(DTYPE), v_tok.to(kv_dt).to(DTYPE)
        ref = exact(q, k_tok, v_tok)  # replaced by the CUDA-core reference page size output once that is computed
        for ps in sizes:
            lay = layout(k_tok, v_tok, ps, g, kv_dt)
            for kind, w in wrappers.items():
                if kind == "xqa":  # no plan; page sizes 16..128 only
                    if ps not in (16, 32, 64, 128):
                        continue
                    w.plan(lay)
                    plan_us = 0.0
                else:
                    dec = kind.startswith(("cuda", "tc"))  # else the prefill kernel with one query row per sequence
                    a, kw = (lay["plan"], {}) if dec else ((lay["qo"], *lay["plan"]), {"causal": False})
                    if kind.startswith("tc/s"):  # fixed_split_size counts pages
                        kw = {"fixed_split_size": max(1, int(kind[4:]) // ps)}
                    plan_us = host_us(functools.partial(w.plan, *a, q_data_type=DTYPE, kv_data_type=kv_dt, **kw))
                out = w.run(q, lay["pools"][0]).float()
                err = ((out - ref).norm() / ref.norm()).item()
                if (kind, ps) == ("cuda", sizes[0]):
                    ref = out
                us = gpu_us(w, q, lay["pools"], args.reps)
                tbs = b * L * KV_HEADS * HEAD_DIM * 2 * kv_dt.itemsize / us / 1e6
                rows.append(r := {"batch": b, "ctx": L, "page_size": ps, "kernel": kind, "us": us, "tb_per_s": tbs,
                                  "rel_err": err, "plan_us": plan_us, **info})
                emit_json(r, args.json)
    big = max(args.batch)
    print(f"\nflashinfer {fi.__version__}, {info.get('card', '?')}: one layer, {QO_HEADS} q / {KV_HEADS} kv heads x "
          f"{HEAD_DIM} bf16, KV {args.kv_dtype}; cuda/tc = decode(use_tensor_cores=False/True), "
          "fa2/fa3 = prefill(backend=), 1 query/seq; xqa = decode.xqa_batch_decode_with_kv_cache")
    print(f"cell: GPU µs (median of {args.reps}), KV TB/s, rel err vs cuda ps={sizes[0]} (that cell: vs fp32 torch)")
    print(f"{'B':>4} {'L':>5} {'ps':>4} | " + " | ".join(f"{k:^21}" for k in wrappers))
    for key in dict.fromkeys((r["batch"], r["ctx"], r["page_size"]) for r in rows):
        cell = {r["kernel"]: r for r in rows if (r["batch"], r["ctx"], r["page_size"]) == key}
        print(f"{key[0]:4d} {key[1]:5d} {key[2]:4d} | " + " | ".join(
            f"{c['us']:7.1f} {c['tb_per_s']:5.2f} {c['rel_err']:7.1e}" if (c := cell.get(k)) else f"{'-':^21}"
            for k in wrappers))
    top = [r for r in rows if (r["batch"], r["ctx"]) == (big, args.ctx)]
    print(f"plan() host µs, B={big} L={args.ctx}, ps {'/'.join(map(str, sizes))}: " + " | ".join(
        k + " " + "/".join(f"{r['plan_us']:.0f}" for r in top if r["kernel"] == k) for k in wrappers))
    for b, L in shapes:
        r = min((r for r in rows if (r["batch"], r["ctx"]) == (b, L)), key=lambda r: r["us"])
        print(f"best B={b} L={L}: {r['kernel']} ps={r['page_size']} {r['us']:.1f} µs ({r['tb_per_s']:.2f} TB/s); "
              f"x{LAYERS} layers + plan = {(LAYERS * r['us'] + r['plan_us']) / 1e3:.2f} ms/step")


if __name__ == "__main__":
    main()
