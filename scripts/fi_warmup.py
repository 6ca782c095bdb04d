"""Compile flashinfer's kernels for the benchmark shapes in parallel, one process per module,
before tests and benchmarks need them one at a time (a fresh machine compiles each on first use).
Run on the GPU machine after `. scripts/device_env.sh`."""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
import traceback

import torch

QO, KV, D = 16, 8, 128  # Qwen3-0.6B's heads; decode for Llama-8B (32/8) uses the prefill module


def _paged(ps: int = 16, pages: int = 64) -> tuple:
    kv = torch.randn(2, pages, ps, KV, D, dtype=torch.bfloat16, device="cuda")
    i32 = dict(dtype=torch.int32, device="cpu")
    return (kv[0], kv[1]), torch.tensor([0, 4], **i32), torch.arange(1, 5, dtype=torch.int32, device="cuda"), \
        torch.tensor([ps], **i32), ps


def build(name: str) -> str:
    import flashinfer as fi

    t = time.time()
    ws = torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
    bf = dict(dtype=torch.bfloat16, device="cuda")
    if name == "decode":
        cache, indptr, idx, last, ps = _paged()
        w = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
        w.plan(indptr, idx, last, QO, KV, D, ps, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
        w.run(torch.randn(1, QO, D, **bf), cache)
    elif name == "prefill":
        cache, indptr, idx, last, ps = _paged()
        w = fi.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend="fa2")
        w.plan(torch.tensor([0, 8], dtype=torch.int32), indptr, idx, last, QO, KV, D, ps, causal=True,
               q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
        w.run(torch.randn(8, QO, D, **bf), cache)
    elif name == "norm":
        x, r, wt = torch.randn(4, 1024, **bf), torch.randn(4, 1024, **bf), torch.ones(1024, **bf)
        fi.norm.rmsnorm(x, wt, 1e-6)
        fi.norm.fused_add_rmsnorm(x, r, wt, 1e-6)
    elif name == "act":
        fi.activation.silu_and_mul(torch.randn(4, 2048, **bf))
    elif name == "rope":
        q, k = torch.randn(4, QO, D, **bf), torch.randn(4, KV, D, **bf)
        cs = torch.randn(64, D, dtype=torch.float32, device="cuda")
        fi.rope.apply_rope_with_cos_sin_cache_inplace(torch.arange(4, device="cuda"), q, k, D, cs, True)
    elif name == "sampling":
        logits = torch.randn(4, 1000, device="cuda")
        fi.sampling.sampling_from_logits(logits)
        fi.sampling.top_k_top_p_sampling_from_probs(
            logits.softmax(-1), torch.full((4,), 5, dtype=torch.int32, device="cuda"),
            torch.full((4,), 0.9, device="cuda"), filter_apply_order="joint")
    elif name == "moe":  # the grouped GEMMs of the MoE experts (flashinfer's segment GEMM)
        x, w = torch.randn(8, 256, **bf), torch.randn(2, 512, 256, **bf)
        fi.SegmentGEMMWrapper(ws).run(x, w, 2, True, seg_indptr=torch.tensor([0, 3, 8], device="cuda"),
                                      weight_indices=torch.arange(2, device="cuda"))
    torch.cuda.synchronize()
    return f"{name}: {time.time() - t:.1f} s"


def _job(name: str) -> str:
    try:
        return build(name)
    except Exception:
        return f"{name}: FAILED\n{traceback.format_exc()}"


if __name__ == "__main__":
    names = sys.argv[1:] or ["prefill", "decode", "norm", "act", "rope", "sampling"]
    t = time.time()
    with mp.get_context("spawn").Pool(len(names)) as pool:
        for line in pool.imap_unordered(_job, names):
            print(line, flush=True)
    print(f"flashinfer warm-up: {time.time() - t:.1f} s", flush=True)
