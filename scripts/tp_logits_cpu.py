"""tp=N (2 by default) against tp=1 in bf16 on the CPU (gloo, torch attention), dummy weights of a config: the
relative error of each step's logits for one 130-token prompt. On the Qwen3-8B shape it tells
whether the GPU check's error is the GPU's or bf16's (needs ~20 GB of RAM, a few minutes):

  python scripts/tp_logits_cpu.py benchmarks/configs/qwen3-8b --tokenizer .tok
  python scripts/tp_logits_cpu.py embedded --tp 3 --fp32-ref   # the embedded SmolLM2 (real weights)"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def logits(model: str | None, tokenizer: str | None, tp: int, dtype: str) -> list[torch.Tensor]:
    import aengine.runtime.runner as runner_mod
    from aengine import LLM, SamplingParams

    rec: list[torch.Tensor] = []
    orig = runner_mod.sample

    def spy(lg: torch.Tensor, st: object) -> torch.Tensor:
        if len(lg):
            rec.append(lg.float().cpu())
        return orig(lg, st)

    runner_mod.sample = spy
    rng = random.Random(0)
    prompt = [rng.randrange(2, 512) for _ in range(130)]
    t = time.perf_counter()
    try:
        with LLM(model, load_format="dummy" if model else "auto", dtype=dtype, device="cpu", tp=tp,
                 kv_cache_tokens=512, tokenizer=tokenizer) as llm:
            llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    finally:
        runner_mod.sample = orig
    print(f"tp={tp}: {time.perf_counter() - t:.0f} s", flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help='a config dir (dummy weights), or "embedded"')
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--fp32-ref", action="store_true", help="also both runs against tp=1 in float32")
    args = ap.parse_args()
    model = None if args.model == "embedded" else args.model
    one, two = logits(model, args.tokenizer, 1, args.dtype), logits(model, args.tokenizer, args.tp, args.dtype)
    exact = logits(model, args.tokenizer, 1, "float32") if args.fp32_ref else []
    for step, (a, b) in enumerate(zip(one, two)):
        print(f"step {step}: relative error {rel(b, a):.4f}; argmax tp=1 {a.argmax(-1).tolist()} "
              f"tp={args.tp} {b.argmax(-1).tolist()}")
        if exact:
            print(f"  against fp32 tp=1: tp=1 {rel(a, exact[step]):.4f}, tp={args.tp} {rel(b, exact[step]):.4f}")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


if __name__ == "__main__":  # the ranks are spawned: they import this file
    main()
