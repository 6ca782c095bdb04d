"""Smoke tests of the benchmark scripts: each starts, finishes at a tiny setting and prints
well-formed JSON. No figure is checked against a threshold: timings belong in RESULTS.md."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "benchmarks" / "configs" / "tiny-llama"


def run(*args: str, timeout: float = 180) -> list[dict]:
    """Run a benchmark script; its JSON lines (from --json -) parsed."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{args[0]} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert rows, f"{args[0]} printed no JSON:\n{p.stdout[-2000:]}"
    return rows


def finite(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x >= 0


def test_w1_recipe_matches_offline() -> None:
    """load.py, peers/hf.py and offline.py draw W1 from benchmarks.common (offline.py once had its own copy)."""
    from benchmarks import offline
    from benchmarks.common import w1_requests

    assert w1_requests(8, (10, 50), (5, 20)) == offline.w1_requests(8, (10, 50), (5, 20))
    _, max_tokens = w1_requests(256, (100, 1024), (100, 1024))
    assert sum(max_tokens) == 133966  # docs/benchmarks.md's total output of W1


def test_overhead() -> None:
    (res,) = run("benchmarks/overhead.py", "--batch-sizes", "1,4", "--steps", "12", "--warmup", "2",
                 "--frames", "200", "--frame-streams", "1,4", "--intake-groups", "2", "--json")
    assert res["workload"] == "w5"
    assert res["w3_intake"]["requests"] == 16 and finite(res["w3_intake"]["cpu_ms"])
    assert [r["batch"] for r in res["steps_table"]] == [1, 4]
    for r in res["steps_table"]:
        assert r["steps"] > 0 and finite(r["cpu_ms_per_step"]) and finite(r["cpu_us_per_token"])
    assert [f["streams_per_connection"] for f in res["frames"]] == [1, 4]
    assert all(finite(f["cpu_us_per_frame"]) and f["frames"] > 0 for f in res["frames"])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """One tiny dummy server for all load.py runs. Its vocab matches the embedded tokenizer that the
    server falls back to, so the chat workload's messages tokenize into valid ids."""
    from benchmarks.common import spawn_server

    d = tmp_path_factory.mktemp("tiny-chat")
    cfg = json.loads((TINY / "config.json").read_text())
    cfg.update(vocab_size=49152, max_position_embeddings=2048)
    (d / "config.json").write_text(json.dumps(cfg))
    with spawn_server(["--model", str(d), "--load-format", "dummy", "--kv-cache-tokens", "8192"],
                      startup_timeout=120, quiet=True) as srv:
        yield srv


def check_load(rows: list[dict], n: int) -> None:
    for r in rows:
        assert r["requests"] == n and r["completed"] == n and r["errors"] == {}
        assert r["output_tokens"] > 0 and finite(r["output_tok_per_s"]) and finite(r["request_throughput"])
        for k in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
            assert set(r[k]) == {"p50", "p90", "p99", "mean"} and all(finite(v) for v in r[k].values()), k


def test_load_random_with_plot(server, tmp_path: Path) -> None:
    png = tmp_path / "load.png"
    rows = run("benchmarks/load.py", "--url", server.url, "--num-prompts", "6", "--input-len", "8,24",
               "--output-len", "4,8", "--request-rate", "40,inf", "--connections", "2", "--plot", str(png), "--json")
    assert [r["request_rate"] for r in rows] == [40.0, "inf"]
    check_load(rows, 6)
    assert png.stat().st_size > 10_000


def test_load_shared_prefix(server) -> None:
    (r,) = run("benchmarks/load.py", "--url", server.url, "--workload", "shared-prefix", "--groups", "2",
               "--num-prompts", "4", "--prefix-len", "64", "--question-len", "8", "--output-len", "4",
               "--concurrency", "2", "--json")
    check_load([r], 4)
    assert r["prompt_tokens"] == 4 * 72 and r["server_prefill_tokens"] >= 0


def test_load_chat(server) -> None:
    (r,) = run("benchmarks/load.py", "--url", server.url, "--workload", "chat", "--num-prompts", "2", "--turns",
               "2", "--input-len", "3,6", "--output-len", "3,5", "--json")
    check_load([r], 4)  # 2 conversations x 2 turns


@pytest.mark.parametrize("workload", ["chat", "random"])
def test_load_openai_api(server, workload: str) -> None:
    """--api openai: the same workloads through OpenAI's chat and completions endpoints."""
    (r,) = run("benchmarks/load.py", "--api", "openai", "--url", server.http, "--workload", workload,
               "--num-prompts", "3", "--turns", "2", "--input-len", "4,8", "--output-len", "3,5", "--json")
    check_load([r], 6 if workload == "chat" else 3)
    assert r["prompt_tokens"] > 0


def test_peer_and_compare(tmp_path: Path) -> None:
    figs = tmp_path / "figs.jsonl"
    # 4 prompts at least: offline.py warms up with prompts[:4] and four SamplingParams
    small = ["--num-prompts", "4", "--input-len", "8,16", "--output-len", "4,8"]
    (eng,) = run("benchmarks/offline.py", "--model", str(TINY), "--load-format", "dummy", *small, "--no-progress",
                 "--kv-cache-tokens", "2048", "--json")
    (peer,) = run("benchmarks/peers/hf.py", "--model", str(TINY), *small, "--mode", "generate", "--no-progress",
                  "--json")
    assert peer["engine"] == "hf" and peer["output_tokens"] > 0 and finite(peer["tok_per_s"])
    figs.write_text(json.dumps(eng) + "\n" + json.dumps(peer) + "\n")
    (cmp,) = run("benchmarks/compare.py", str(figs), "--json")
    (row,) = cmp["comparison"]
    assert row["workload"] == "w1" and row["peer"].startswith("hf generate") and finite(row["ratio"])


def test_offline_w2_and_w6_tp2() -> None:
    (w2,) = run("benchmarks/offline.py", "--workload", "w2", "--model", str(TINY), "--load-format", "dummy",
                "--w2-prompt-len", "8", "--w2-output-len", "6", "--w2-ttft-len", "32", "--repeats", "1",
                "--kv-cache-tokens", "2048", "--json")
    assert w2["output_tokens"] == 6 and finite(w2["decode_tok_per_s"]) and finite(w2["ttft_ms"])
    (w6,) = run("benchmarks/offline.py", "--workload", "w6", "--tp", "2", "--model", str(TINY), "--load-format",
                "dummy", "--w6-batch", "4", "--w2-prompt-len", "8", "--w2-output-len", "6", "--no-progress",
                "--kv-cache-tokens", "2048", "--json")
    assert w6["tp"] == 2 and w6["batch"] == 4 and w6["output_tokens"] == 24 and finite(w6["decode_tok_per_s"])


def test_startup() -> None:
    (r,) = run("benchmarks/startup.py", "--model", str(TINY), "--load-format", "dummy", "--device", "cpu", "--json")
    assert r["tracked_objects"] > 0 and finite(r["import_s"]) and finite(r["engine_s"])
    assert len(r["full_gc_ms"]) == len(r["full_gc_frozen_ms"]) == 3
    assert all(map(finite, r["full_gc_ms"] + r["full_gc_frozen_ms"]))


def test_arrivals() -> None:
    """W4's tail in-process: every token of every request arrives, the steps are counted by kind, and the gaps
    over twice the median say what ran inside them."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import w1_requests

    (r,) = run("benchmarks/arrivals.py", "--model", str(TINY), "--load-format", "dummy", "--num-prompts", "12",
               "--input-len", "8,64", "--output-len", "4,24", "--request-rate", "40", "--json")
    assert r["output_tokens"] == sum(w1_requests(12, (8, 64), (4, 24), 0)[1])
    assert r["steps"]["prefill"] >= 1 and r["steps"]["decode"] >= 1 and finite(r["itl_ms"]["p99"])
    # a token waits for at least one step after the one that carried the token before it; known kinds
    top, over = r["top_1pct"], r["over_2x_p50"]
    assert top["gaps"] >= 1 and sum(top["steps_per_gap"].values()) >= 1, top
    assert not over["gaps"] or sum(over["steps_per_gap"].values()) >= 1, over
    assert set(top["steps_per_gap"]) | set(over["steps_per_gap"]) <= {"decode", "prefill", "mixed"}
    assert 0 <= top["with_prefill"] <= 1


@pytest.mark.parametrize("script", [["benchmarks/attn_bench.py", "--prefill"], ["benchmarks/gemm_bench.py"]])
def test_gpu_only_benchmarks_refuse_without_cuda(script: list[str]) -> None:
    """The kernel microbenchmarks need CUDA: without it they parse their flags and say so, exit 2."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the device run covers these")
    p = subprocess.run([sys.executable, *script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 2 and "needs a CUDA GPU" in p.stderr, (p.returncode, p.stderr[-2000:])
