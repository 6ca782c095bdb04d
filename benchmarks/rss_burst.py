"""RSS of the server after a burst of big prompts: does memory come back once the senders leave?

Starts `python -m aengine ARGS`, opens --connections connections, sends --prompts generate frames of
--chars characters on each at once (big enough to occupy the tokenizer threads, small enough to pass
the size check that runs before tokenizing), reads every answer, disconnects, waits --wait seconds
and prints the server's RSS before the burst, at its peak (sampled every 20 ms) and after the wait,
as one JSON line.

  python benchmarks/rss_burst.py                                   # the embedded model
  python benchmarks/rss_burst.py --connections 4 --prompts 24 --chars 1000000 --spawn "--max-model-len 8192"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from websockets.asyncio.client import connect  # noqa: E402

from benchmarks.common import spawn_server  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def sender(url: str, n: int, prompt: str, codes: dict[str, int]) -> None:
    async with connect(url, max_size=None) as ws:
        await ws.recv()  # hello
        for i in range(n):
            await ws.send(json.dumps({"type": "generate", "id": str(i), "prompt": prompt, "max_tokens": 1}))
        for _ in range(n):
            m = json.loads(await ws.recv())
            while m["type"] not in ("done", "error"):
                m = json.loads(await ws.recv())
            key = m.get("code", m.get("finish_reason", "done"))
            codes[key] = codes.get(key, 0) + 1


async def burst(url: str, pid: int, args: argparse.Namespace) -> tuple[float, dict[str, int]]:
    codes: dict[str, int] = {}
    prompt = "word " * (args.chars // 5)
    task = asyncio.gather(*(sender(url, args.prompts, prompt, codes) for _ in range(args.connections)))
    peak = 0.0
    while not task.done():
        peak = max(peak, rss_mib(pid))
        await asyncio.sleep(0.02)
    await task
    return peak, codes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spawn", default="", metavar="ARGS", help="server flags (default: the embedded model)")
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=24, help="generate frames per connection")
    ap.add_argument("--chars", type=int, default=1_000_000, help="characters per prompt")
    ap.add_argument("--wait", type=float, default=10.0, help="seconds after the senders left")
    ap.add_argument("--rounds", type=int, default=1, help="bursts in a row (RSS after each)")
    args = ap.parse_args()
    with spawn_server(shlex.split(args.spawn), quiet=True) as srv:
        pid = srv.proc.pid
        time.sleep(2.0)  # let start-up settle
        before = rss_mib(pid)
        rounds = []
        for _ in range(args.rounds):
            t0 = time.monotonic()
            peak, codes = asyncio.run(burst(srv.url, pid, args))
            seconds = time.monotonic() - t0
            time.sleep(args.wait)
            rounds.append(dict(peak_mib=round(peak, 1), after_mib=round(rss_mib(pid), 1),
                               burst_s=round(seconds, 2), answers=codes))
    print(json.dumps(dict(connections=args.connections, prompts=args.prompts, chars=args.chars, wait_s=args.wait,
                          before_mib=round(before, 1), rounds=rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
