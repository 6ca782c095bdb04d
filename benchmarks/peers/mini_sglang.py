"""The peer that counts (docs/benchmarks.md): W1 and W2 through Mini-SGLang's offline LLM API, on the same
machine and the same dummy-weight shapes, written as JSON rows with offline.py's keys so that
benchmarks/compare.py sets them side by side. Only its public API is driven (minisgl.llm.LLM,
minisgl.core.SamplingParams); it is importable on the GPU machine after the kit's run_peer.sh
(the Mini-SGLang kit on the GPU machine), with the PYTHONPATH and variables that script prints.

W1: the kit's bench_peer.py (= upstream benchmark/offline/bench.py): 256 prompts and max_tokens from
random.Random(0) (the same draw as offline.py), temperature 0.6, ignore_eos, page 256,
max_extend_tokens 16384, CUDA graphs to batch 256, one warm-up generate, tok/s = sum(max_tokens) / time.
W2: the kit's bench_w2.py: batch 1, 128 -> 512 tokens (decode rate from the 1- and 512-token wall
times), TTFT of a 1,024-token prompt, fresh ids every run, median of 3.
MODEL is a directory with config.json and tokenizer files (run_peer.sh builds /tmp/q06).

  python benchmarks/peers/mini_sglang.py --workload w1 --model /tmp/q06 --json peers.jsonl
  python benchmarks/peers/mini_sglang.py --workload w2 --model /tmp/l8b --json peers.jsonl
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable from a source checkout

from benchmarks.common import emit_json, machine, w1_requests  # noqa: E402

W1_OUTPUT_TOKENS, W1_PROMPT_TOKENS = 133966, 142827  # bench.py's totals on the default draw


def w1(LLM: Any, SP: Any, args: argparse.Namespace) -> dict[str, Any]:
    t = time.time()
    llm = LLM(args.model, max_seq_len_override=4096, max_extend_tokens=16384, cuda_graph_max_bs=256, page_size=256,
              use_dummy_weight=True, attention_backend=args.attn)
    startup = time.time() - t
    prompts, max_tokens = w1_requests(256, (100, 1024), (100, 1024))
    sps = [SP(temperature=0.6, ignore_eos=True, max_tokens=m) for m in max_tokens]
    llm.generate(["Benchmark: "], SP(temperature=0.1))  # bench.py's warm-up (1,024 tokens, its default)
    t = time.time()
    outs = llm.generate(prompts, sps)
    dt = time.time() - t
    total = sum(max_tokens)  # bench.py's Total; counted_output_tokens is what came back
    if total != W1_OUTPUT_TOKENS or sum(map(len, prompts)) != W1_PROMPT_TOKENS:
        print("minisgl.py: WARNING: the W1 draw differs from bench.py's totals", file=sys.stderr)
    return {"output_tokens": total, "prompt_tokens": sum(map(len, prompts)), "seconds": dt, "tok_per_s": total / dt,
            "counted_output_tokens": sum(len(o["token_ids"]) for o in outs), "startup_s": startup,
            "page_size": 256, "cuda_graph_max_bs": 256, "max_extend_tokens": 16384}


def w2(LLM: Any, SP: Any, args: argparse.Namespace) -> dict[str, Any]:
    t = time.time()
    llm = LLM(args.model, max_seq_len_override=4096, cuda_graph_max_bs=16, use_dummy_weight=True,
              attention_backend=args.attn)
    startup = time.time() - t
    rng = random.Random(0)
    fresh = lambda n: [rng.randint(0, 10000) for _ in range(n)]  # new ids each run: nothing cached
    sp = lambda n: SP(temperature=0.6, ignore_eos=True, max_tokens=n)
    llm.generate([fresh(16)], sp(8))  # warm-up

    def wall(n_prompt: int, n_out: int) -> float:
        p = fresh(n_prompt)
        t = time.perf_counter()
        llm.generate([p], sp(n_out))
        return time.perf_counter() - t

    wall(1024, 1)  # warm-up of the TTFT shape, as offline.py: its first run pays one-off costs
    t1 = statistics.median(wall(128, 1) for _ in range(3))
    t512 = statistics.median(wall(128, 512) for _ in range(3))
    ttft = statistics.median(wall(1024, 1) for _ in range(3)) * 1e3
    return {"output_tokens": 512, "seconds": t512, "tok_per_s": 512 / t512, "decode_tok_per_s": 511 / (t512 - t1),
            "ttft_ms": ttft, "ttft_prompt_tokens": 1024, "repeats": 3, "startup_s": startup, "page_size": 1,
            "cuda_graph_max_bs": 16}


def peer_commit() -> str:
    """$MINISGL_COMMIT, else the kit's MINISGL_COMMIT.txt beside the imported tree, else unknown."""
    if os.environ.get("MINISGL_COMMIT"):
        return os.environ["MINISGL_COMMIT"]
    import minisgl

    f = Path(list(minisgl.__path__)[0]).resolve().parents[2] / "MINISGL_COMMIT.txt"  # kit/mini-sglang/python/minisgl
    return f.read_text().split()[0][:12] if f.is_file() else "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="w1", choices=["w1", "w2"])
    ap.add_argument("--model", default="/tmp/q06", help="a directory with config.json and tokenizer files")
    ap.add_argument("--attn", default="fi", help="Mini-SGLang attention_backend (fi, fa, fa,fi, auto)")
    ap.add_argument("--json", nargs="?", const="-", default=None, help="append one JSON line (stdout: no path)")
    args = ap.parse_args(argv)
    try:
        import torch
        from minisgl.core import SamplingParams
        from minisgl.llm import LLM
    except ImportError as e:
        print(f"minisgl.py: Mini-SGLang is not importable ({e}); run the kit's run_peer.sh and use its PYTHONPATH")
        return 2
    res = (w1 if args.workload == "w1" else w2)(LLM, SamplingParams, args)
    overlap = os.environ.get("MINISGL_DISABLE_OVERLAP_SCHEDULING", "0").lower() not in ("1", "true", "yes")
    row = {"engine": "mini-sglang", "workload": args.workload, "model": args.model, "attn": args.attn,
           "cache": "radix", "tp": 1, "overlap": overlap, "device": "cuda", "dtype": "bfloat16",
           "dummy_weight": True, "cuda_graphs": True, **res, **machine()}
    row["aengine_commit"], row["commit"] = row["commit"], peer_commit()  # the checkout that ran it; the peer's
    row["card"] = torch.cuda.get_device_name()
    print(f"mini-sglang {args.workload}: {row['output_tokens']} output tokens in {row['seconds']:.2f} s = "
          f"{row['tok_per_s']:,.1f} tok/s" + (f"; decode {row['decode_tok_per_s']:.1f} tok/s, TTFT "
                                               f"{row['ttft_ms']:.1f} ms" if args.workload == "w2" else ""))
    emit_json(row, args.json)
    return 0


if __name__ == "__main__":
    rc = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)  # as the kit's bench_peer.py: Mini-SGLang's teardown (gloo group, CUDA graphs) may hang
