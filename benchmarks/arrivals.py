"""W4's inter-token tail without the WebSocket, and what sits inside it: W1-like requests (load.py's `random`
workload: the same prompts, max_tokens, Poisson send times and temperature) arrive in-process at the scheduler
coroutine the server runs; every step is recorded (executor.launch wrapped, as step_profile.py does) and every
token's time at the emit callback, with the step whose results carried it. Prints ITL p50/p90/p99 and, for the gaps
over 2x the median and for the top 1 %, the steps each token waited for (those after the step that carried the token
before it, up to the one that carried it: with overlap, the first of them was launched before that token was out) by
kind, their prompt tokens, and how many of those gaps held a prefill.

  python benchmarks/arrivals.py --model benchmarks/configs/qwen3-0.6b --load-format dummy --tokenizer .tok \\
      --request-rate 32
  python benchmarks/arrivals.py --model benchmarks/configs/tiny-llama --load-format dummy --num-prompts 16 \\
      --input-len 8,64 --output-len 8,32 --request-rate 50     # CPU smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a source checkout

from benchmarks.common import emit_json, machine, pair, percentiles, step_kind, w1_requests  # noqa: E402
from benchmarks.load import arrivals  # noqa: E402


def describe(gaps: list[tuple[float, int, int]], steps: list[tuple[float, str, int]]) -> dict[str, Any]:
    """For gaps (ms, k, j) between tokens carried by steps k and j: the mean count of steps of each kind among
    k+1..j, their prompt tokens, and the share of gaps that held a step with prompt tokens."""
    kinds: Counter[str] = Counter()
    tokens = []
    for _, k, j in gaps:
        inside = steps[k + 1 : j + 1]
        kinds.update(kind for _, kind, _ in inside)
        tokens.append(sum(n for _, kind, n in inside if kind != "decode"))
    n = max(1, len(gaps))
    return {"gaps": len(gaps), "steps_per_gap": {k: round(v / n, 2) for k, v in sorted(kinds.items())},
            "with_prefill": round(sum(t > 0 for t in tokens) / n, 3),
            "prompt_tokens_inside": percentiles(tokens, (50, 90, 99)) if tokens else {}}


async def run(engine: Any, jobs: list[tuple[list[int], Any]], at: list[float],
              processed: list[float]) -> dict[str, list[tuple[float, int]]]:
    """Submit each job at its send time; every token's emission time and carrying step (index into processed, the
    steps whose results are in, in launch order), by request."""
    times: dict[str, list[tuple[float, int]]] = {}
    done, left = asyncio.Event(), [len(jobs)]

    def emitter(rid: str) -> Any:
        def emit(d: Any) -> None:
            times[rid].extend([(time.perf_counter(), len(processed) - 1)] * len(d.token_ids))
            if d.finish_reason is not None:
                left[0] -= 1
                if not left[0]:
                    done.set()
        return emit

    t0 = time.perf_counter()
    for i, ((ids, params), t) in enumerate(zip(jobs, at)):
        if (wait := t0 + t - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        times[rid := f"arr-{i}"] = []
        engine.submit(rid, ids, params, emitter(rid))
    await done.wait()
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=pair, default=(100, 1024))
    ap.add_argument("--output-len", type=pair, default=(100, 1024))
    ap.add_argument("--request-rate", type=float, default=32.0, help="requests/s, Poisson; inf: all at once")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine-json", default="{}", help='more EngineConfig fields: \'{"enable_mixed_chunk": true}\'')
    ap.add_argument("--json", nargs="?", const="-", default=None, help="append one JSON line (stdout: no path)")
    args = ap.parse_args(argv)

    from aengine import SamplingParams
    from aengine.config import EngineConfig
    from aengine.engine import AsyncEngine, new_event_loop

    cfg = EngineConfig().replace(model=args.model, load_format=args.load_format, tokenizer=args.tokenizer,
                                 **json.loads(args.engine_json))
    engine, loop = AsyncEngine(cfg), new_event_loop()
    loop.run_until_complete(engine.start())
    steps: list[tuple[float, str, int]] = []  # (launch time, kind, prompt tokens)
    ex, orig = engine.executor, engine.executor.launch

    def launch(inp: Any, *more: Any) -> Any:
        kind = step_kind(inp)
        steps.append((time.perf_counter(), kind, 0 if inp.decode else sum(inp.extend_lens) - inp.decoding))
        return orig(inp, *more)

    processed: list[float] = []
    result = ex.result

    async def counted(pending: Any) -> Any:
        ids = await result(pending)
        processed.append(time.perf_counter())
        return ids

    # instance attributes shadow the methods: the scheduler calls self.ex.launch(inp), self.ex.result(pending)
    ex.launch, ex.result = launch, counted
    prompts, max_tokens = w1_requests(args.num_prompts, args.input_len, args.output_len, args.seed)
    vocab = engine.hf_config.vocab_size
    jobs = [([t % vocab for t in p], SamplingParams(max_tokens=m, temperature=args.temperature, ignore_eos=True))
            for p, m in zip(prompts, max_tokens)]
    try:
        times = loop.run_until_complete(run(engine, jobs, arrivals(len(jobs), args.request_rate, args.seed),
                                                   processed))
    finally:
        loop.run_until_complete(engine.shutdown())
        loop.close()
    gaps = sorted(((b - a) * 1e3, k, j) for ts in times.values() for (a, k), (b, j) in zip(ts, ts[1:]))
    itl = [g for g, _, _ in gaps]
    p = percentiles(itl, (50, 90, 99))
    over = [g for g in gaps if g[0] > 2 * p["p50"]]
    top = gaps[-max(1, len(gaps) // 100):]
    res = {"benchmark": "arrivals", "model": args.model or "embedded", "request_rate": args.request_rate,
           "num_prompts": len(jobs), "output_tokens": sum(map(len, times.values())),
           "engine": json.loads(args.engine_json), "itl_ms": p,
           "p99_over_p50": p["p99"] / p["p50"], "steps": dict(Counter(k for _, k, _ in steps)),
           "over_2x_p50": describe(over, steps), "top_1pct": describe(top, steps), **machine()}
    rate = "inf" if math.isinf(args.request_rate) else f"{args.request_rate:g}"
    print(f"{len(jobs)} requests at {rate} req/s: ITL p50/p90/p99 {p['p50']:.2f}/{p['p90']:.2f}/{p['p99']:.2f} ms "
          f"(p99/p50 {res['p99_over_p50']:.2f}x); steps {res['steps']}")
    for name in ("over_2x_p50", "top_1pct"):
        d = res[name]
        tok = "/".join(f"{d['prompt_tokens_inside'].get(k, 0):.0f}" for k in ("p50", "p90", "p99"))
        print(f"  gaps {name}: {d['gaps']}, {d['with_prefill']:.0%} with prompt tokens; steps waited for, mean: "
              f"{d['steps_per_gap']}; their prompt tokens p50/p90/p99: {tok}")
    emit_json(res, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
