"""Start-up, on any machine: seconds to import aengine, seconds to build the engine (`LLM(...)`), and what a
full garbage collection then costs in that process, before and after `gc.freeze()` (which the server runs
once its engine is built: start-up's objects live as long as it does, and a full collection walks them all).

  python benchmarks/startup.py                                       # the embedded model (on the CPU: fp32)
  python benchmarks/startup.py --model benchmarks/configs/qwen3-0.6b --load-format dummy --tokenizer .tok
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a source checkout

from benchmarks.common import emit_json, machine  # noqa: E402


def full_collection_ms() -> float:
    t = time.perf_counter()
    gc.collect()
    return (time.perf_counter() - t) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--num-pages", type=int, default=0, help="0: the engine's default pool")
    ap.add_argument("--log", action="store_true", help="the engine's INFO log: its own start-up breakdown")
    ap.add_argument("--json", nargs="?", const="-", default=None, help="append one JSON line (stdout: no path)")
    args = ap.parse_args(argv)
    if args.log:
        logging.basicConfig(level=logging.INFO)
    t0 = time.perf_counter()
    from aengine import LLM, SamplingParams

    t1 = time.perf_counter()
    llm = LLM(args.model, load_format=args.load_format, tokenizer=args.tokenizer, device=args.device,
              num_pages=args.num_pages)
    t2 = time.perf_counter()
    llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=4))  # one request served, as a server's would be
    objects = len(gc.get_objects())
    before = [full_collection_ms() for _ in range(3)]
    gc.freeze()
    after = [full_collection_ms() for _ in range(3)]
    llm.close()
    res = {"benchmark": "startup", "model": args.model or "embedded", "import_s": t1 - t0, "engine_s": t2 - t1,
           "tracked_objects": objects, "full_gc_ms": before, "full_gc_frozen_ms": after, **machine()}
    print(f"start-up {t2 - t0:.2f} s: imports {res['import_s']:.2f} s, engine {res['engine_s']:.2f} s; "
          f"a full collection over {objects:,} "
          f"objects: {', '.join(f'{x:.1f}' for x in before)} ms; after gc.freeze: "
          f"{', '.join(f'{x:.1f}' for x in after)} ms")
    emit_json(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
