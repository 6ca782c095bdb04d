"""The loop answers GET /health within 100 ms (99 % of polls; none over 1 s) under the worst mix of
accepted requests (issue 18, finding 3: 16 requests with 500,000 stop strings each made /health
take 10.9 s). The load is the
worst the limits allow: 256 streams at once (the running limit), each with 16 stop strings of 256
characters and 256 stop token ids, while another connection keeps sending the biggest prompts the
size check lets through to the tokenizer threads and frames just under the frame limit that it
refuses. The load runs in its own process, so that this one only times /health.

A bound, not a benchmark: every poll counts, none is dropped."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import random
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from tests.conftest import build_tiny
from tests.server_util import http_get, running_server

SECONDS = 20.0
CONTEXT = 2048
STOPS = [chr(0x41 + i) * 128 + " the" * 32 for i in range(16)]  # 16 of 256 characters: partial matches galore
STOP_IDS = list(range(1000, 1256))


async def _streams(url: str, live: int, deadline: float, seen: dict[str, int]) -> None:
    rng = random.Random(live)
    async with connect(url, max_size=None) as ws:
        await ws.recv()
        n = 0

        async def one() -> None:
            nonlocal n
            n += 1
            ids = [rng.randrange(49152) for _ in range(rng.randrange(16, 64))]
            await ws.send(json.dumps({"type": "generate", "id": str(n), "input_ids": ids, "max_tokens": 48,
                                      "ignore_eos": True, "temperature": 0.8, "stop": STOPS,
                                      "stop_token_ids": STOP_IDS}))

        for _ in range(live):
            await one()
        while time.monotonic() < deadline:
            m = json.loads(await ws.recv())
            seen[m["type"]] = seen.get(m["type"], 0) + 1
            if m["type"] in ("done", "error"):
                await one()


async def _big(url: str, deadline: float, seen: dict[str, int]) -> None:
    tokenized = "word " * (CONTEXT * 160 // 5)  # just under the size check: tokenized, then too long
    refused = "x" * (4 * 1024 * 1024 - 200)  # just under --max-frame-bytes: refused by the size check
    async with connect(url, max_size=None) as ws:
        await ws.recv()
        for i in range(4):
            await ws.send(json.dumps({"type": "generate", "id": f"b{i}", "prompt": tokenized}))
        i = 4
        while time.monotonic() < deadline:
            m = json.loads(await ws.recv())
            seen["big " + m.get("code", m["type"])] = seen.get("big " + m.get("code", m["type"]), 0) + 1
            i += 1
            await ws.send(json.dumps({"type": "generate", "id": f"b{i}", "prompt": tokenized if i % 2 else refused}))


def load(url: str, out: str) -> None:
    os.nice(10)  # the server's loop is timed, not this process: leave it the cores

    async def go() -> dict[str, int]:
        seen: dict[str, int] = {}
        deadline = time.monotonic() + SECONDS
        await asyncio.gather(*(_streams(url, 32, deadline, seen) for _ in range(8)), _big(url, deadline, seen))
        return seen

    Path(out).write_text(json.dumps(asyncio.run(go())))


def poll(url: str, until: float | None = None, n: int = 0) -> list[float]:
    """Seconds each GET /health took, one every 50 ms, n times or while `until()` holds."""
    times = []
    while (until is not None and until()) or len(times) < n:
        t = time.monotonic()
        status, _ = http_get(url + "/health", timeout=5.0)
        times.append(time.monotonic() - t)
        assert status == 200
        time.sleep(0.05)
    return times


def test_health_answers_within_100ms_under_the_worst_accepted_load(tmp_path: Path) -> None:
    model = build_tiny("llama", tmp_path / "tiny", vocab_size=49152)  # the embedded tokenizer's ids
    with running_server("--model", str(model), "--dtype", "float32", "--device", "cpu",
                        "--max-model-len", str(CONTEXT), "--max-running-requests", "256") as srv:
        idle = max(poll(srv.http, n=200))
        if idle >= 0.1:  # the machine itself, not the server's loop: nothing to learn about the bound here
            pytest.skip(f"/health of the idle server took {idle * 1e3:.0f} ms: the machine is too busy to time 100 ms")
        out = tmp_path / "seen.json"
        proc = multiprocessing.get_context("spawn").Process(target=load, args=(srv.url, str(out)))
        proc.start()
        time.sleep(3.0)  # the streams are admitted and the tokenizer threads busy
        times = poll(srv.http, until=proc.is_alive)
        proc.join()
        seen = json.loads(out.read_text())
    assert seen.get("delta", 0) > 256 and seen.get("big context_length_exceeded", 0) > 4, seen
    assert len(times) > 100, len(times)
    times.sort()
    # 99 % of polls within 100 ms, and none stalled: the slowest poll is allowed 1 s, because on a
    # 2-core machine the OS alone can keep the loop's thread off a core for a few time slices (the
    # load process and the step and tokenizer threads share those cores); finding 3 stalled it 10.9 s
    p99 = times[int(len(times) * 0.99)]
    slow = [round(t * 1e3) for t in times[-8:]]
    assert p99 < 0.1 and times[-1] < 1.0, f"p99 /health {p99 * 1e3:.0f} ms, median " \
        f"{times[len(times) // 2] * 1e3:.1f} ms (idle {idle * 1e3:.0f} ms); the 8 slowest (ms): {slow}"
