"""Offline benchmarks through aengine.LLM (the same scheduler as the server).

W1, offline throughput (docs/benchmarks.md): 256 prompts of random ids, lengths and max_tokens drawn with
random.seed(0); temperature 0.6, ignore_eos; 133,966 output tokens on the default settings.
W2, single-stream decode: batch 1, a 128-token prompt, 512 output tokens; plus the time to the
first token of a 1,024-token prompt.
W6, decode at batch 64 (run it with --tp 1 and --tp 2): 64 prompts of 128 random ids, 512 output
tokens each, all admitted at once; decode tok/s counts the tokens after each request's first.

  python benchmarks/offline.py --model benchmarks/configs/qwen3-0.6b --load-format dummy
  python benchmarks/offline.py --workload w2 --model benchmarks/configs/llama-3.1-8b --load-format dummy
  python benchmarks/offline.py --workload w6 --model benchmarks/configs/qwen3-8b --load-format dummy --tp 2
  # CPU smoke test
  python benchmarks/offline.py --model benchmarks/configs/tiny-llama --load-format dummy \
      --num-prompts 4 --input-len 8,32 --output-len 4,16
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a source checkout

from aengine import LLM, SamplingParams  # noqa: E402
from benchmarks.common import pair, w1_requests  # noqa: E402

# --constrained-frac: that share of W1's requests get this schema. At least 200 items, of 10-30
# tokens each, so the grammar stays open (masks of a live matcher) up to every request's max_tokens
W1_SCHEMA = {"type": "array", "minItems": 200, "items": {
    "type": "object", "required": ["name", "value"], "additionalProperties": False,
    "properties": {"name": {"type": "string", "maxLength": 16}, "value": {"type": "integer"}}}}


def params(max_tokens: int, schema: dict | None = None) -> SamplingParams:
    return SamplingParams(temperature=0.6, max_tokens=max_tokens, ignore_eos=True, json_schema=schema)


def run_w1(llm: LLM, args: argparse.Namespace) -> dict:
    prompts, max_tokens = w1_requests(args.num_prompts, args.input_len, args.output_len)
    chosen = set(random.Random(1).sample(range(len(prompts)), round(args.constrained_frac * len(prompts))))
    # warm-up: first-use kernel compiles and allocator growth stay out of the timing (and the
    # grammar engine's tokenizer and the schema's compile, with --constrained-frac)
    n = min(4, len(prompts))
    llm.generate([p[:64] for p in prompts[:n]], [params(8, W1_SCHEMA if chosen and i == 0 else None) for i in range(n)])
    llm.clear_cache()
    t = time.perf_counter()
    outs = llm.generate(prompts, [params(m, W1_SCHEMA if i in chosen else None) for i, m in enumerate(max_tokens)],
                        use_tqdm=not args.no_progress)
    dt = time.perf_counter() - t
    n_out = sum(len(o.token_ids) for o in outs)
    return {"output_tokens": n_out, "prompt_tokens": sum(map(len, prompts)), "seconds": dt,
            "tok_per_s": n_out / dt, "constrained": len(chosen)}


def run_w2(llm: LLM, args: argparse.Namespace) -> dict:
    rng = random.Random(0)
    ids = [[rng.randint(0, 10000) for _ in range(n)] for n in (args.w2_prompt_len, args.w2_ttft_len)]
    llm.generate([ids[0][:16]], params(8))  # warm-up
    runs = []
    for _ in range(args.repeats):
        llm.clear_cache()
        t = time.perf_counter()
        o = llm.generate([ids[0]], params(args.w2_output_len), use_tqdm=False)[0]
        dt = time.perf_counter() - t
        n = len(o.token_ids)
        # decode rate between the first and the last token: what the weight-read floor bounds
        runs.append({"seconds": dt, "tok_per_s": n / dt,
                     "decode_tok_per_s": (n - 1) / ((o.total_ms - o.ttft_ms) / 1e3)})
    ttft = []
    for i in range(-1, args.repeats):  # run -1 warms the shape up (one-off allocations, kernel choices): untimed
        llm.clear_cache()
        prompt = [(t + i + 1) % 10000 for t in ids[1]]  # fresh ids: nothing cached
        t = time.perf_counter()
        llm.generate([prompt], params(1), use_tqdm=False)
        if i >= 0:
            ttft.append((time.perf_counter() - t) * 1e3)
    med = statistics.median
    return {"output_tokens": args.w2_output_len, "seconds": med(r["seconds"] for r in runs),
            "tok_per_s": med(r["tok_per_s"] for r in runs),
            "decode_tok_per_s": med(r["decode_tok_per_s"] for r in runs),
            "ttft_ms": med(ttft), "ttft_prompt_tokens": args.w2_ttft_len, "repeats": args.repeats}


def run_w6(llm: LLM, args: argparse.Namespace) -> dict:
    rng = random.Random(0)
    prompts = [[rng.randint(0, 10000) for _ in range(args.w2_prompt_len)] for _ in range(args.w6_batch)]
    llm.generate([p[:16] for p in prompts[:4]], params(8))  # warm-up
    llm.clear_cache()
    t = time.perf_counter()
    outs = llm.generate(prompts, params(args.w2_output_len), use_tqdm=not args.no_progress)
    dt = time.perf_counter() - t
    n_out = sum(len(o.token_ids) for o in outs)
    # from the last first token on, every step decodes the whole batch
    decode_s = dt - max(o.ttft_ms for o in outs) / 1e3
    return {"output_tokens": n_out, "seconds": dt, "tok_per_s": n_out / dt, "batch": len(prompts),
            "decode_tok_per_s": sum(len(o.token_ids) - 1 for o in outs) / decode_s}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", "--config", dest="model", default="benchmarks/configs/qwen3-0.6b",
                    help="HF model dir, or a dir / config.json with --load-format dummy")
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--tokenizer", default=None, help="default: the model dir, else the embedded one")
    ap.add_argument("--workload", default="w1", choices=["w1", "w2", "w6"])
    ap.add_argument("--attn", default="auto", help="torch | fi | fa, or prefill,decode such as fa,fi")
    ap.add_argument("--cache", default="radix", choices=["radix", "none"])
    ap.add_argument("--disable-overlap", action="store_true")
    ap.add_argument("--cuda-graph-max-bs", type=int, default=256)
    ap.add_argument("--piecewise-cuda-graph-max-tokens", type=int, default=2048, help="0: prefill runs eagerly")
    ap.add_argument("--max-prefill-tokens", type=int, default=8192)
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=pair, default=(100, 1024), help="W1 prompt length range lo,hi")
    ap.add_argument("--output-len", type=pair, default=(100, 1024), help="W1 max_tokens range lo,hi")
    ap.add_argument("--constrained-frac", type=float, default=0.0,
                    help="W1: this share of the requests is constrained by a JSON schema (structured output)")
    ap.add_argument("--w2-prompt-len", type=int, default=128)
    ap.add_argument("--w2-output-len", type=int, default=512)
    ap.add_argument("--w2-ttft-len", type=int, default=1024)
    ap.add_argument("--w6-batch", type=int, default=64)
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (one GPU each)")
    ap.add_argument("--repeats", type=int, default=3, help="W2: runs, the median is reported")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--page-size", type=int, default=0)
    ap.add_argument("--max-running-requests", type=int, default=256)
    ap.add_argument("--kv-cache-tokens", type=int, default=32768, help="CPU pool size")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8_e4m3", "fp8"],
                    help="KV cache storage: auto (the model dtype) or fp8_e4m3")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--json", nargs="?", const="-", default=None, help="write the figures as JSON (to stdout: no path)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    llm = LLM(args.model, load_format=args.load_format, tokenizer=args.tokenizer, attn=args.attn,
              cache=args.cache, disable_overlap=args.disable_overlap, cuda_graph_max_bs=args.cuda_graph_max_bs,
              dtype=args.dtype, device=args.device, page_size=args.page_size,
              max_running_requests=args.max_running_requests, kv_cache_tokens=args.kv_cache_tokens, tp=args.tp,
              kv_cache_dtype=args.kv_cache_dtype, max_prefill_tokens=args.max_prefill_tokens,
              piecewise_cuda_graph_max_tokens=args.piecewise_cuda_graph_max_tokens)
    startup = time.perf_counter() - t0
    try:
        res = {"w1": run_w1, "w2": run_w2, "w6": run_w6}[args.workload](llm, args)
    finally:
        runner = llm.engine.runner
        info = {"device": str(runner.device), "dtype": str(runner.dtype).removeprefix("torch."),
                "attn": args.attn, "page_size": runner.page_size,
                "kv_cache_dtype": runner.kv_cache_dtype, "kv_tokens": runner.num_pages * runner.page_size,
                "cuda_graphs": bool(getattr(runner, "graphs", None) and runner.graphs.sizes),
                "prefill_graphs": bool(getattr(runner, "graphs", None) and runner.graphs.psizes)}
        llm.close()
    try:
        import torch

        if runner.device.type == "cuda":
            info["card"] = torch.cuda.get_device_name(runner.device)
    except Exception:
        pass
    res = {"workload": args.workload, "model": args.model, "cache": args.cache, "tp": args.tp,
           "overlap": not args.disable_overlap, "startup_s": startup, **info, **res}
    print(f"{args.workload}: {res['output_tokens']} output tokens in {res['seconds']:.2f} s = "
          f"{res['tok_per_s']:,.0f} tok/s" + (f"; decode {res['decode_tok_per_s']:.1f} tok/s, TTFT "
                                             f"{res['ttft_ms']:.1f} ms" if args.workload == "w2" else "")
          + (f"; decode {res['decode_tok_per_s']:,.0f} tok/s at batch {res['batch']}, tp={args.tp}"
             if args.workload == "w6" else ""))
    if args.json == "-":
        print(json.dumps(res))
    elif args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(res) + "\n")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
