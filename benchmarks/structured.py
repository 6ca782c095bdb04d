"""Structured output's host cost (W5 style, any machine): the time a decode step spends on the event
loop thread waits per constrained row for the grammar worker (Grammars.advance_and_fill: advancing
the row's matcher by the sampled token and filling its next token mask, on llguidance's threads),
plus the mask's application to the logits (runtime/sampler.py) on this machine's CPU.

Each row follows a valid compact JSON document of one of several schemas (its tokens, then EOS),
so the masks are those of real outputs; a batch of B rows holds B matchers over the schemas in turn.
The figure is wall time (perf_counter), mean and p99 over the steps, divided by B; under overlap it
hides behind the step's forward when it is shorter.

  python benchmarks/structured.py                          # batch 1 8 32 64
  python benchmarks/structured.py --batch-sizes 1,64 --json out.jsonl
  python benchmarks/structured.py --tokenizer DIR --vocab 151936   # another tokenizer, W1's vocabulary
  python benchmarks/structured.py --w1 --batch-sizes 26 --threads 1   # W1_SCHEMA's rows, one llguidance thread
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a source checkout

from aengine.runtime.sampler import apply_token_masks  # noqa: E402
from aengine.scheduler.grammar import Grammars  # noqa: E402
from aengine.tokenizer import Tokenizer  # noqa: E402
from aengine.types import SamplingParams  # noqa: E402
from aengine.weights import load_hf_config, resolve_model  # noqa: E402
from benchmarks.common import emit_json, machine  # noqa: E402

S = {"type": "string", "maxLength": 40}
DOCS = [  # (schema, a valid document)
    ({"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                       "email": S}, "required": ["name", "age", "email"]},
     {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org"}),
    ({"type": "object", "properties": {"items": {"type": "array", "items": {
        "type": "object", "properties": {"sku": S, "qty": {"type": "integer", "minimum": 1},
                                         "price": {"type": "number"}},
        "required": ["sku", "qty", "price"]}}}, "required": ["items"]},
     {"items": [{"sku": "A-100", "qty": 2, "price": 9.5}, {"sku": "B-7", "qty": 1, "price": 120.25},
                {"sku": "C-42", "qty": 12, "price": 0.99}]}),
    ({"type": "object", "properties": {"status": {"enum": ["ok", "warn", "fail"]}, "detail": {
        "type": "object", "properties": {"code": {"type": "integer"}, "message": S}, "required": ["code", "message"]}},
      "required": ["status", "detail"]},
     {"status": "warn", "detail": {"code": 299, "message": "disk almost full on the node"}}),
    ({"type": "object"}, {"title": "Notes", "tags": ["a", "b", "c"], "nested": {"x": 1, "y": [True, None, 2.5]}}),
]


def w1_docs(n: int = 4) -> list[tuple[dict, object]]:
    """offline.py's W1_SCHEMA (what --constrained-frac constrains) with n valid documents of 200 items."""
    from benchmarks.offline import W1_SCHEMA

    rng = random.Random(0)
    return [(W1_SCHEMA, [{"name": "".join(rng.choice("abcdefghij klmnoXYZ") for _ in range(rng.randint(0, 16))),
                          "value": rng.randint(-10**6, 10**9)} for _ in range(200)]) for _ in range(n)]


def run(g: Grammars, tok: Tokenizer, batch: int, vocab: int, docs: list, max_steps: int) -> dict:
    seqs = [tok.encode(json.dumps(d, separators=(",", ":"))) + [g.eos] for _, d in docs]
    base = [g.compile(SamplingParams(json_schema=s).constraint) for s, _ in docs]
    rows = [SimpleNamespace(matcher=base[i % len(docs)].deep_copy(), finish_reason=None, seq=seqs[i % len(docs)])
            for i in range(batch)]
    logits = torch.randn(batch, vocab)
    job, apply = [], []
    for step in range(min(min(map(len, seqs)), max_steps)):
        t0 = time.perf_counter()  # as the scheduler: last step's tokens consumed, this step's masks filled
        pairs = [(r.matcher, r.seq[step - 1]) for r in rows] if step else []
        masks = g.advance_and_fill(lambda p=pairs: p, rows).result()
        t1 = time.perf_counter()
        apply_token_masks(logits, list(range(batch)), masks)
        job.append(t1 - t0), apply.append(time.perf_counter() - t1)
    us = lambda xs: {"mean": 1e6 * statistics.mean(xs) / batch,  # noqa: E731
                     "p99": 1e6 * sorted(xs)[int(0.99 * (len(xs) - 1))] / batch}
    return {"batch": batch, "steps": len(job), "vocab": vocab, "llguidance_threads": g.threads,
            "host_us_per_row": us(job), "apply_us_per_row": us(apply)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,8,32,64")
    ap.add_argument("--json", help="append one JSON line per batch size to this file ('-': stdout)")
    ap.add_argument("--tokenizer", help="a tokenizer directory (default: the embedded model's)")
    ap.add_argument("--vocab", type=int, help="the model's vocabulary, if larger (Qwen3's: 151936)")
    ap.add_argument("--w1", action="store_true", help="rows follow offline.py's W1_SCHEMA instead of the four schemas")
    ap.add_argument("--steps", type=int, default=300, help="at most this many steps per batch size")
    ap.add_argument("--threads", type=int, default=0, help="llguidance's threads (0: the engine's default)")
    args = ap.parse_args()
    path = resolve_model(None) if args.tokenizer is None else Path(args.tokenizer)
    tok = Tokenizer(path)
    vocab = args.vocab or load_hf_config(path).vocab_size
    g = Grammars(tok, vocab, min(tok.eos_ids), threads=args.threads)
    docs = w1_docs() if args.w1 else DOCS
    torch.set_num_threads(1)
    t = time.perf_counter()
    g.compile(SamplingParams(json_schema=docs[0][0]).constraint)
    print(f"first compile (incl. llguidance's tokenizer): {time.perf_counter() - t:.2f} s", flush=True)
    run(g, tok, 4, vocab, docs, args.steps)  # warm-up
    for b in map(int, args.batch_sizes.split(",")):
        res = {**run(g, tok, b, vocab, docs, args.steps), "schema": "w1" if args.w1 else "four", **machine()}
        h, a = res["host_us_per_row"], res["apply_us_per_row"]
        print(f"batch {b:3d}: consume + fill {h['mean']:6.1f} us/row/step (p99 {h['p99']:6.1f}; {g.threads} threads, "
              f"vocab {vocab}); mask apply on this CPU {a['mean']:.1f} us/row", flush=True)
        emit_json(res, args.json)


if __name__ == "__main__":
    main()
