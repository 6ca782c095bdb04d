"""Engine vs peer, side by side with ratios, from the JSON lines that offline.py and the peers
(peers/hf.py, peers/mini_sglang.py) write (--json FILE appends one line per figure). Rows are grouped by
workload; each engine row is divided by the best successful peer row of the same workload and machine.

  python benchmarks/compare.py figures.jsonl peers.jsonl
  python benchmarks/compare.py figures.jsonl --json -    # the table as JSON too
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a source checkout

from benchmarks.common import emit_json  # noqa: E402

METRICS = {"w1": ("tok_per_s",), "w2": ("tok_per_s", "decode_tok_per_s", "ttft_ms")}
LOWER_IS_BETTER = {"ttft_ms"}
PEERS = {"hf", "mini-sglang"}  # rows of these engines are peers; any other row is aengine


def read(paths: list[str]) -> list[dict[str, Any]]:
    rows = []
    for p in paths:
        for line in Path(p).read_text().splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut off by a timeout: skip it, keep the rest
    return rows


def label(r: dict[str, Any]) -> str:
    if r.get("engine") == "hf":
        return f"hf {r.get('mode')} [{r.get('attn')}]"
    if r.get("engine") == "mini-sglang":
        return f"mini-sglang [{r.get('attn')}]" + ("" if r.get("overlap", True) else " no-overlap")
    parts = [f"attn={r.get('attn')}", "overlap" if r.get("overlap", True) else "no-overlap"]
    if r.get("cache") == "none":
        parts.append("no-cache")
    if not r.get("cuda_graphs", True):
        parts.append("no-graphs")
    if r.get("constrained"):
        parts.append(f"{r['constrained']} constrained")
    return "aengine " + " ".join(parts)


def table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for wl, metrics in METRICS.items():
        engine = [r for r in rows if r.get("workload") == wl and r.get("engine", "aengine") not in PEERS]
        peers = [r for r in rows if r.get("workload") == wl and r.get("engine") in PEERS and "error" not in r]
        for m in metrics:
            cands = [p for p in peers if m in p]
            best = None
            if cands:
                best = (min if m in LOWER_IS_BETTER else max)(cands, key=lambda p: p[m])
            for r in engine:
                if m not in r:
                    continue
                ratio = None
                if best is not None and best[m] and r[m]:
                    ratio = best[m] / r[m] if m in LOWER_IS_BETTER else r[m] / best[m]
                out.append({"workload": wl, "metric": m, "engine": label(r), "engine_value": r[m],
                            "peer": label(best) if best else None, "peer_value": best[m] if best else None,
                            "ratio": ratio, "card": r.get("card") or r.get("cpu")})
            if not engine:
                for p in cands:
                    out.append({"workload": wl, "metric": m, "engine": None, "engine_value": None,
                                "peer": label(p), "peer_value": p[m], "ratio": None, "card": p.get("card")})
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="JSON lines from offline.py / peers/*.py")
    ap.add_argument("--json", nargs="?", const="-", default=None)
    args = ap.parse_args(argv)
    rows = table(read(args.files))
    fmt = lambda v: "-" if v is None else f"{v:,.1f}"
    print(f"{'workload':<8} {'metric':<17} {'engine':<38} {'value':>10}  {'peer':<34} {'value':>10}  {'ratio':>6}")
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        print(f"{r['workload']:<8} {r['metric']:<17} {r['engine'] or '-':<38} {fmt(r['engine_value']):>10}  "
              f"{r['peer'] or '-':<34} {fmt(r['peer_value']):>10}  {ratio:>6}")
    print("ratio: engine / peer (for ttft_ms, peer / engine): above 1 means the engine is better")
    emit_json({"comparison": rows}, args.json)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
