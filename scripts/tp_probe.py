"""Tensor parallelism on a multi-GPU machine, stage by stage: build an engine with tp=2 (CUDA graphs
up to batch 16), generate, close; then the same with tp=1. Each stage runs under a watchdog that
dumps every thread's stack (faulthandler's own thread, so it fires even inside C calls that hold
the GIL) and ends the process, so a hang shows where it is instead of eating the device time.

  PYTHONFAULTHANDLER=1 python3 scripts/tp_probe.py benchmarks/configs/qwen3-8b 90
(model dir with config.json, dummy weights; seconds per stage; tokenizer from .tok)"""

from __future__ import annotations

import faulthandler
import logging
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

T0 = time.time()


def say(*a: object) -> None:
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def main() -> None:
    from aengine import LLM, SamplingParams

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(processName)s %(name)s %(message)s")
    model, stage_s = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 90
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    rng = random.Random(0)
    prompts = [[rng.randrange(2, 10000) for _ in range(n)] for n in (130, 157, 150)]
    for tp, graphs in [(2, 16), (1, 16)]:
        faulthandler.dump_traceback_later(stage_s, exit=True)
        say(f"start tp={tp} graphs={graphs}")
        llm = LLM(model, load_format="dummy", tokenizer=".tok", tp=tp, cuda_graph_max_bs=graphs, num_pages=8192)
        say("built")
        say("generated", [o.token_ids for o in llm.generate(prompts, greedy)])
        llm.close()
        say("closed")
        faulthandler.cancel_dump_traceback_later()
        del llm
        torch.cuda.empty_cache()


if __name__ == "__main__":  # the ranks are spawned: they import this file
    main()
