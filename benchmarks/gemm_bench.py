"""The decode step's GEMMs on W1's shape (Qwen3-0.6B: per layer QKV 1024->4096, O 2048->1024, gate/up
1024->6144, down 3072->1024; the LM head 1024->151,936), at the batch sizes W1's decode steps run, through
cuBLAS (torch's F.linear, the engine's path), cuBLASLt, and a Triton kernel autotuned per shape over tile
sizes that put more CTAs on the weights. A decode GEMM reads its weights once: the figure of merit is
weight TB/s (the H200's HBM gives ~4.3 in a device-to-device copy). Relative error vs fp32 for each.
  python benchmarks/gemm_bench.py [--batch 64,128,212,256] [--json gemm.jsonl]   # ~2 min on an H200
--shapes llama-8b instead takes the prefill GEMMs behind W2's TTFT (Llama-3.1-8B, 32 layers: QKV 4096->6144, O
4096->4096, gate/up 4096->28,672, down 14,336->4096) at --batch 1024 rows; there the figure of merit is TFLOP/s.
"""

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as python3 benchmarks/gemm_bench.py

import torch  # noqa: E402

from benchmarks.common import emit_json, machine  # noqa: E402

SHAPES = {"qwen3-0.6b": (28, {"qkv": (1024, 4096), "o": (2048, 1024), "gate_up": (1024, 6144), "down": (3072, 1024),
                               "lm_head": (1024, 151_936)}),
          "llama-8b": (32, {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28_672), "down": (14_336, 4096)})}
COPIES = 8  # weights rotate over 8 copies (> the 50 MB L2 for every shape but the LM head's one)


def ints(s: str) -> list[int]:
    return [int(x) for x in s.replace("/", ",").split(",")]


def triton_linear() -> Any:
    import triton
    import triton.language as tl

    configs = [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
               for bm, bn, bk, w, s in [(64, 32, 128, 4, 4), (64, 64, 128, 4, 4), (64, 128, 64, 4, 4),
                                        (128, 64, 64, 4, 4), (128, 128, 64, 8, 3), (64, 32, 256, 4, 3),
                                        (32, 64, 128, 4, 4), (64, 64, 256, 4, 3), (128, 32, 128, 4, 4),
                                        (128, 256, 64, 8, 3), (256, 128, 64, 8, 3)]]  # the last two: prefill

    @triton.autotune(configs=configs, key=["M", "N", "K"])
    @triton.jit
    def _linear(x, w, y, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """y[M, N] = x[M, K] @ w[N, K].T: one (BM x BN) tile per program, weights read in BK slabs."""
        pm, pn = tl.program_id(1), tl.program_id(0)
        rm, rn, rk = pm * BM + tl.arange(0, BM), pn * BN + tl.arange(0, BN), tl.arange(0, BK)
        acc = tl.zeros([BM, BN], tl.float32)
        for k0 in range(0, K, BK):
            a = tl.load(x + rm[:, None] * K + (k0 + rk)[None, :], mask=rm[:, None] < M, other=0.0)
            b = tl.load(w + rn[None, :] * K + (k0 + rk)[:, None], mask=rn[None, :] < N, other=0.0)
            acc = tl.dot(a, b, acc)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(y + rm[:, None] * N + rn[None, :], acc.to(y.dtype.element_ty), mask=mask)

    def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        m, k = x.shape
        n = w.shape[0]
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
        _linear[lambda meta: (triton.cdiv(n, meta["BN"]), triton.cdiv(m, meta["BM"]))](x, w, y, m, n, k)
        return y

    linear.kernel = _linear  # type: ignore[attr-defined]
    return linear


def gpu_us(fn: Any, x: torch.Tensor, ws: list[torch.Tensor], reps: int) -> float:
    for i in range(10):
        fn(x, ws[i % COPIES])
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    torch.cuda._sleep(reps * 200_000)  # queue every rep while the GPU sleeps: the events time kernels, not launches
    for i, (a, z) in enumerate(ev):
        a.record()
        fn(x, ws[i % COPIES])
        z.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(z) for a, z in ev) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="qwen3-0.6b", choices=list(SHAPES))
    ap.add_argument("--batch", type=ints, default=None, help="rows M (default: 32,64,128,212,256; llama-8b: 1024)")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--no-triton", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gemm_bench: needs a CUDA GPU, and torch sees none", file=sys.stderr)
        sys.exit(2)
    layers, shapes = SHAPES[args.shapes]
    batch = args.batch or ([1024] if args.shapes == "llama-8b" else [32, 64, 128, 212, 256])
    dev, dt, info = torch.device("cuda"), torch.bfloat16, {"bench": "gemm_decode", "shapes": args.shapes, **machine()}
    tri = None if args.no_triton else triton_linear()

    def lt(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, w)

    kinds: dict[str, Any] = {"cublas": lt, "cublaslt": lt}  # the same call; torch's preferred BLAS set before each
    if tri is not None:
        kinds["triton"] = tri
    per_step: dict[tuple[str, int], float] = {}
    print(f"{'shape':>8} {'M':>4} | " + " | ".join(f"{k:^30}" for k in kinds) + " | triton config")
    for name, (k, n) in shapes.items():
        g = torch.Generator(device=dev).manual_seed(0)
        ws = [torch.randn(n, k, dtype=dt, device=dev, generator=g) * k**-0.5 for _ in range(COPIES)]
        for m in batch:
            x = torch.randn(m, k, dtype=dt, device=dev, generator=g)
            ref = x.float() @ ws[0].float().T
            cells, cfg = [], ""
            for kind, fn in kinds.items():
                torch.backends.cuda.preferred_blas_library("cublaslt" if kind == "cublaslt" else "cublas")
                out = fn(x, ws[0]).float()
                err = ((out - ref).norm() / ref.norm()).item()
                us = gpu_us(fn, x, ws, args.reps)
                tbs, tflops = n * k * 2 / us / 1e6, 2 * m * n * k / us / 1e6
                mult = 1 if name == "lm_head" else layers
                per_step[(kind, m)] = per_step.get((kind, m), 0.0) + us * mult
                if kind == "triton":
                    cfg = str(tri.kernel.best_config)
                emit_json({"shape": name, "m": m, "k": k, "n": n, "kernel": kind, "us": us, "tb_per_s": tbs,
                           "tflop_per_s": tflops,
                           "rel_err": err, **({"config": cfg} if cfg else {}), **info}, args.json)
                cells.append(f"{us:7.1f} µs {tflops:4.0f} TF/s {tbs:4.2f} {err:7.1e}")
            print(f"{name:>8} {m:4d} | " + " | ".join(cells) + f" | {cfg}")
        del ws
    print(f"cell: GPU µs (median), TFLOP/s, weight TB/s, rel err vs fp32. Per step ({layers} layers"
          f"{' + LM head' if 'lm_head' in shapes else ''}), ms:")
    for m in batch:
        print(f"  M={m:4d}: " + ", ".join(f"{k} {per_step[(k, m)] / 1e3:.3f}" for k in kinds))


if __name__ == "__main__":
    main()
