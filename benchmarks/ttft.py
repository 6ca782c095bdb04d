"""W2's time to first token, taken apart: one fresh prompt per LLM.generate (max_tokens=1), as offline.py times it,
with the engine's step launch and result wrapped (no engine change). Per run: the call to the launch, the launch
(host), launch end to the step's result in the loop, and that to generate's return; on CUDA also the GPU span from
the launch's start to the step's end (CUDA events), and of it the time before the GPU is first given work.

  python benchmarks/ttft.py --model benchmarks/configs/llama-3.1-8b --load-format dummy --tokenizer .tok
  python benchmarks/ttft.py --model benchmarks/configs/tiny-llama --load-format dummy --device cpu \\
      --prompt-len 256 --repeats 3     # CPU smoke test
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a source checkout

from benchmarks.common import emit_json, machine  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="benchmarks/configs/llama-3.1-8b")
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=7, help="timed runs (one untimed first); medians are reported")
    ap.add_argument("--piecewise-cuda-graph-max-tokens", type=int, default=2048, help="0: prefill runs eagerly")
    ap.add_argument("--json", nargs="?", const="-", default=None, help="append one JSON line (stdout: no path)")
    args = ap.parse_args(argv)

    import torch

    from aengine import LLM, SamplingParams

    llm = LLM(args.model, load_format=args.load_format, tokenizer=args.tokenizer, device=args.device,
              piecewise_cuda_graph_max_tokens=args.piecewise_cuda_graph_max_tokens)
    ex = llm.engine.executor
    cuda = bool(getattr(ex, "cuda", False))
    mark: dict[str, Any] = {}
    launch, result = ex.launch, ex.result

    def timed_launch(inp: Any, *more: Any) -> Any:
        if cuda:
            mark["ev0"] = torch.cuda.Event(enable_timing=True)
            mark["ev0"].record()
        mark["l0"] = time.perf_counter()
        p = launch(inp, *more)
        mark["l1"] = time.perf_counter()
        if cuda:
            mark["ev1"] = torch.cuda.Event(enable_timing=True)
            mark["ev1"].record()
        return p

    async def timed_result(p: Any) -> Any:
        ids = await result(p)
        mark["r"] = time.perf_counter()
        return ids

    ex.launch, ex.result = timed_launch, timed_result  # instance attributes shadow the methods the scheduler calls
    runner = ex.runner
    # inside the launch (CUDA graphs): when the attention plan starts and ends, and when the replay is called/returns
    if cuda and runner.graphs is not None:
        backend, graph_cls = runner.graphs.prefill_backend, torch.cuda.CUDAGraph
        prepare, replay = backend.prepare_graph, graph_cls.replay

        def timed_prepare(fb: Any) -> None:
            mark["p0"] = time.perf_counter()
            prepare(fb)
            mark["p1"] = time.perf_counter()

        def timed_replay(g: Any) -> None:
            mark["g0"] = time.perf_counter()
            replay(g)
            mark["g1"] = time.perf_counter()

        backend.prepare_graph, graph_cls.replay = timed_prepare, timed_replay
    rng = random.Random(0)
    base = [rng.randint(0, 10000) for _ in range(args.prompt_len)]
    sp = SamplingParams(max_tokens=1, temperature=0.6, ignore_eos=True)
    rows = []
    try:
        for i in range(-1, args.repeats):  # run -1 warms the shape up, untimed (as offline.py)
            llm.clear_cache()
            t0 = time.perf_counter()
            llm.generate([[(t + i + 1) % 10000 for t in base]], sp)
            t1 = time.perf_counter()
            if i < 0:
                continue
            row = {"ttft_ms": (t1 - t0) * 1e3, "to_launch_ms": (mark["l0"] - t0) * 1e3,
                   "launch_ms": (mark["l1"] - mark["l0"]) * 1e3, "to_result_ms": (mark["r"] - mark["l1"]) * 1e3,
                   "to_return_ms": (t1 - mark["r"]) * 1e3}
            if "g0" in mark and mark["g0"] > mark["l0"]:  # the step replayed a graph: the launch's parts
                row |= {"before_plan_ms": (mark["p0"] - mark["l0"]) * 1e3, "plan_ms": (mark["p1"] - mark["p0"]) * 1e3,
                        "to_replay_ms": (mark["g0"] - mark["p1"]) * 1e3, "replay_ms": (mark["g1"] - mark["g0"]) * 1e3,
                        "after_replay_ms": (mark["l1"] - mark["g1"]) * 1e3}
            if cuda:
                mark["ev1"].synchronize()
                row["gpu_span_ms"] = mark["ev0"].elapsed_time(mark["ev1"])
            rows.append(row)
    finally:
        llm.close()
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"TTFT({args.prompt_len}) median of {len(rows)}: {med['ttft_ms']:.2f} ms = call to launch "
          f"{med['to_launch_ms']:.2f} + launch {med['launch_ms']:.2f} + to the result {med['to_result_ms']:.2f} + "
          f"to the return {med['to_return_ms']:.2f}" + (f"; GPU span from the launch's start to the step's end "
                                                         f"{med['gpu_span_ms']:.2f} ms" if cuda else ""))
    if "replay_ms" in med:
        print(f"  the launch: before the plan {med['before_plan_ms']:.2f}, plan {med['plan_ms']:.2f}, to the replay "
              f"{med['to_replay_ms']:.2f}, replay call {med['replay_ms']:.2f}, after it {med['after_replay_ms']:.2f}")
    res = {"benchmark": "ttft", "model": args.model, "prompt_tokens": args.prompt_len, "median": med, "runs": rows,
           "piecewise_cuda_graph_max_tokens": args.piecewise_cuda_graph_max_tokens, **machine()}
    emit_json(res, args.json)
    return res


if __name__ == "__main__":
    main()
