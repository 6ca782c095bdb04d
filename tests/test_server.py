"""The real server as a subprocess on a free loopback port, driven by real WebSocket clients."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from aengine import SamplingParams
from clients.client import Client, ServerError
from tests.server_util import ServerProcess, http_get, running_server

ENGINE_ARGS = ("--dtype", "float32", "--device", "cpu")  # the same options as the `embedded` LLM fixture

PROMPTS = [f"{w} is" for w in ("Paris", "The sea", "A cat", "Python", "Music", "The moon", "Bread", "Winter",
                               "My friend", "Gold", "Rain", "The road")]
CHATS = [[{"role": "user", "content": q}] for q in ("What is 2+2?", "Name a color.", "Say hi.", "What is ice?")]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server(*ENGINE_ARGS) as srv:
        yield srv


async def frames(ws: ClientConnection, n: int, timeout: float = 60.0) -> list[dict[str, Any]]:
    return [json.loads(await asyncio.wait_for(ws.recv(), timeout)) for _ in range(n)]


async def until_done(ws: ClientConnection, rid: str, timeout: float = 60.0) -> tuple[str, dict[str, Any]]:
    text = ""
    while True:
        m = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if m.get("id") != rid:
            continue
        if m["type"] == "delta":
            text += m["text"]
        elif m["type"] in ("done", "error"):
            return text, m


def wait_metric(srv: ServerProcess, name: str, value: float, timeout: float = 5.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = srv.metrics()
        if m[name] == value or time.monotonic() > deadline:
            return m
        time.sleep(0.02)


def test_hello_health_metrics(server: ServerProcess) -> None:
    async def go() -> dict[str, Any]:
        async with connect(server.url) as ws:
            return (await frames(ws, 1))[0]

    assert asyncio.run(go()) == {"type": "hello", "model": "SmolLM2-135M-Instruct", "max_context": 8192,
                                 "protocol": 1}
    assert http_get(server.http + "/health") == (200, "ok\n")
    m = server.metrics()
    for name in ("aengine_requests_running", "aengine_requests_waiting", "aengine_kv_pages_used",
                 "aengine_kv_pages_free", "aengine_cache_hit_tokens_total", "aengine_generated_tokens_total",
                 "aengine_time_to_first_token_seconds_count", "aengine_inter_token_latency_seconds_count",
                 "aengine_gc_full_collection_seconds_count", "aengine_mixed_steps_total"):
        assert name in m


def test_concurrent_requests_match_offline(server: ServerProcess, embedded: Any) -> None:
    sp = SamplingParams(max_tokens=12, temperature=0.0)
    want = [o.text for o in embedded.generate(PROMPTS, sp)] + [o.text for o in embedded.chat(CHATS, sp)]

    async def go() -> list[Any]:
        async with await Client.connect(server.url) as c:
            reqs = [c.complete(p, max_tokens=12, temperature=0.0) for p in PROMPTS]
            reqs += [c.complete(messages=m, max_tokens=12, temperature=0.0) for m in CHATS]
            return await asyncio.gather(*reqs)

    got = asyncio.run(go())
    assert len(got) == 16
    assert [r.text for r in got] == want
    assert all(r.finish_reason in ("stop", "length") and r.usage["completion_tokens"] >= 1 for r in got)


def test_stream_false_and_stop_strings(server: ServerProcess) -> None:
    async def go() -> tuple[Any, ...]:
        async with await Client.connect(server.url) as c:
            streamed = await c.complete("The capital of France", max_tokens=16, temperature=0.0)
            whole = await c.complete("The capital of France", max_tokens=16, temperature=0.0, stream=False)
            stop = streamed.text.split()[2]
            stopped = await c.complete("The capital of France", max_tokens=16, temperature=0.0, stop=stop)
            return streamed, whole, stopped, stop

    streamed, whole, stopped, stop = asyncio.run(go())
    assert whole.text == streamed.text and whole.token_ids == [] and whole.usage["cached_tokens"] > 0
    assert stopped.finish_reason == "stop" and stop not in stopped.text
    assert streamed.text.startswith(stopped.text)


def test_cancel_frees_kv(server: ServerProcess) -> None:
    async def go() -> tuple[dict[str, Any], dict[str, float]]:
        async with connect(server.url) as ws:
            await frames(ws, 1)
            await ws.send(json.dumps({"type": "generate", "id": "c1", "prompt": "Count: one, two,",
                                      "max_tokens": 500, "ignore_eos": True, "temperature": 0}))
            assert (await frames(ws, 1))[0]["type"] == "delta"
            busy = server.metrics()
            await ws.send(json.dumps({"type": "cancel", "id": "c1"}))
            _, done = await until_done(ws, "c1")
            return done, busy

    done, busy = asyncio.run(go())
    assert busy["aengine_kv_pages_used"] > 0 and busy["aengine_requests_running"] == 1
    assert done["type"] == "done" and done["finish_reason"] == "cancelled"
    assert 1 <= done["usage"]["completion_tokens"] < 500
    m = wait_metric(server, "aengine_kv_pages_used", 0)
    assert m["aengine_kv_pages_used"] == 0 and m["aengine_requests_running"] == 0


def test_disconnect_frees_kv(server: ServerProcess) -> None:
    async def go() -> dict[str, float]:
        ws = await connect(server.url)
        await frames(ws, 1)
        for i in range(3):
            await ws.send(json.dumps({"type": "generate", "id": f"d{i}", "prompt": f"List {i}:",
                                      "max_tokens": 500, "ignore_eos": True}))
        await frames(ws, 3)
        busy = server.metrics()
        ws.transport.abort()  # vanish without a close handshake, like a killed client
        return busy

    busy = asyncio.run(go())
    assert busy["aengine_kv_pages_used"] > 0
    m = wait_metric(server, "aengine_kv_pages_used", 0)
    assert m["aengine_kv_pages_used"] == 0 and m["aengine_requests_running"] == 0
    assert m["aengine_requests_waiting"] == 0


BAD_FRAMES: list[tuple[str, str]] = [  # (frame, expected error code)
    ("not json", "invalid_request"),
    ("", "invalid_request"),
    ("[1, 2]", "invalid_request"),
    ("null", "invalid_request"),
    ("{}", "invalid_request"),
    ('{"type": "bogus", "id": "x"}', "invalid_request"),
    ('{"type": "generate", "id": "x"}', "invalid_request"),
    ('{"type": "generate", "id": "x", "prompt": "a", "messages": [{"role": "user", "content": "b"}]}',
     "invalid_request"),
    ('{"type": "generate", "id": "x", "prompt": "a", "input_ids": [1]}', "invalid_request"),
    ('{"type": "generate", "prompt": "a"}', "invalid_request"),
    ('{"type": "generate", "id": "", "prompt": "a"}', "invalid_request"),
    ('{"type": "generate", "id": 7, "prompt": "a"}', "invalid_request"),
    ('{"type": "generate", "id": "x", "prompt": 5}', "invalid_request"),
    ('{"type": "generate", "id": "x", "messages": "hi"}', "invalid_request"),
    ('{"type": "generate", "id": "x", "messages": []}', "invalid_request"),
    ('{"type": "generate", "id": "x", "messages": [{"role": "user"}]}', "invalid_request"),
    ('{"type": "generate", "id": "x", "messages": [{"role": 1, "content": "a"}]}', "invalid_request"),
    ('{"type": "generate", "id": "x", "input_ids": ["a"]}', "invalid_request"),
    ('{"type": "generate", "id": "x", "input_ids": []}', "invalid_request"),
    ('{"type": "generate", "id": "x", "input_ids": [999999999]}', "invalid_request"),
    ('{"type": "generate", "id": "x", "prompt": "a", "max_tokens": 0}', "invalid_request"),
    ('{"type": "generate", "id": "x", "prompt": "a", "max_tokens": "5"}', "invalid_request"),
    ('{"type": "generate", "id": "x", "prompt": "a", "max_tokens": true}', "invalid_request"),
    ('{"type": "generate", "id": "x", "prompt": "a", "temperature": -1}', "invalid_request"),
    ('{"type": "generate", "id": "x", "prompt": "a", "temperature": "hot"}', "invalid_request"),
    ('{"type": "generate", "id": "x", "prompt": "a", "top_p": 0}', "invalid_request"),
    ('{"type": "generate", "id": "x", "prompt": "a", "top_k": -5}', "invalid_request"),
    ('{"type": "generate", "id": "x", "prompt": "a", "min_p": 1.5}', "invalid_request"),
    ('{"type": "generate", "id": "x", "prompt": "a", "seed": -1}', "invalid_request"),
    ('{"type": "generate", "id": "x", "prompt": "a", "stop": 5}', "invalid_request"),
    ('{"type": "generate", "id": "x", "prompt": "a", "stop_token_ids": [-1]}', "invalid_request"),
    ('{"type": "generate", "id": "x", "prompt": "a", "ignore_eos": "yes"}', "invalid_request"),
    ('{"type": "generate", "id": "x", "prompt": "a", "stream": "no"}', "invalid_request"),
    ('{"type": "generate", "id": "x", "prompt": "a", "max_token": 5}', "invalid_request"),
    ('{"type": "generate", "id": "x", "prompt": "a", "max_tokens": 9000}', "context_length_exceeded"),
    ('{"type": "generate", "id": "x", "input_ids": [' + ",".join(["1"] * 8192) + "]}", "context_length_exceeded"),
    ('{"type": "cancel"}', "invalid_request"),
    ('{"type": "cancel", "id": "nobody"}', "invalid_request"),
]


def test_malformed_frames_get_errors_and_connection_lives(server: ServerProcess) -> None:
    async def go() -> tuple[list[dict[str, Any]], dict[str, Any], str]:
        async with connect(server.url, max_size=None) as ws:
            await frames(ws, 1)
            errors = []
            for frame, _ in BAD_FRAMES:
                await ws.send(frame)
                errors += await frames(ws, 1)
            await ws.send(b"\xff\x00 binary garbage")
            errors += await frames(ws, 1)
            await ws.send(json.dumps({"type": "generate", "id": "ok", "prompt": "Hello", "max_tokens": 4}))
            text, done = await until_done(ws, "ok")
            return errors, done, text

    errors, done, text = asyncio.run(go())
    assert len(BAD_FRAMES) >= 20
    for (frame, code), err in zip(BAD_FRAMES + [("binary", "invalid_request")], errors):
        assert err["type"] == "error" and err["code"] == code, (frame, err)
        assert isinstance(err["message"], str) and err["message"]
    assert errors[6]["id"] == "x" and errors[0]["id"] is None
    assert done["type"] == "done" and done["usage"]["completion_tokens"] == 4 and text


def test_duplicate_live_id(server: ServerProcess) -> None:
    async def go() -> tuple[dict[str, Any], dict[str, Any]]:
        async with connect(server.url) as ws:
            await frames(ws, 1)
            req = {"type": "generate", "id": "dup", "prompt": "Hello", "max_tokens": 20, "ignore_eos": True}
            await ws.send(json.dumps(req))
            await ws.send(json.dumps(req))
            first = None
            while True:
                m = json.loads(await asyncio.wait_for(ws.recv(), 60))
                if m["type"] == "error":
                    first = m
                if m["type"] == "done":
                    return first, m

    err, done = asyncio.run(go())
    assert err is not None and err["id"] == "dup" and err["code"] == "invalid_request"
    assert done["finish_reason"] == "length" and done["usage"]["completion_tokens"] == 20


def test_client_library_errors(server: ServerProcess) -> None:
    async def go() -> None:
        async with await Client.connect(server.url) as c:
            with pytest.raises(ServerError) as e:
                await c.complete("x", max_tokens=100_000)
            assert e.value.code == "context_length_exceeded"
            # breaking out of the iterator cancels the request on the server
            async for m in c.generate("Once upon a time", max_tokens=300, ignore_eos=True):
                assert m["type"] == "delta"
                break
            r = await c.complete("Hi", max_tokens=2, temperature=0)
            assert r.usage["completion_tokens"] == 2

    asyncio.run(go())
    assert wait_metric(server, "aengine_kv_pages_used", 0)["aengine_kv_pages_used"] == 0


def test_health_answers_during_long_cpu_batch(server: ServerProcess) -> None:
    async def health_ms() -> float:
        t = time.perf_counter()
        r, w = await asyncio.open_connection("127.0.0.1", server.port)
        w.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status = (await r.readline()).decode()
        w.close()
        assert " 200 " in status
        return (time.perf_counter() - t) * 1e3

    async def go() -> tuple[list[float], float]:
        async with connect(server.url) as ws:
            await frames(ws, 1)
            long_prompt = " ".join(f"word{i}" for i in range(400))  # ~1,400 tokens: a prefill step of seconds
            await ws.send(json.dumps({"type": "generate", "id": "long", "prompt": long_prompt, "max_tokens": 1}))
            done_task = asyncio.create_task(until_done(ws, "long", timeout=120))
            await asyncio.sleep(0.3)  # tokenized and in the forward by now
            lat = []
            while not done_task.done():
                lat.append(await health_ms())
                await asyncio.sleep(0.05)
            _, done = await done_task
            return lat, done["timing"]["total_ms"]

    lat, total_ms = asyncio.run(go())
    assert total_ms > 1000, "the batch was not long enough to test anything"
    assert len(lat) >= 5
    assert max(lat) < 100, lat


def test_greedy_same_without_overlap(server: ServerProcess) -> None:
    async def run(url: str) -> list[tuple[str, list[int]]]:
        async with await Client.connect(url) as c:
            rs = await asyncio.gather(*(c.complete(p, max_tokens=10, temperature=0.0) for p in PROMPTS[:8]))
            return [(r.text, r.token_ids) for r in rs]

    with running_server(*ENGINE_ARGS, "--disable-overlap") as plain:
        without = asyncio.run(run(plain.url))
        assert plain.stop() == 0
    assert asyncio.run(run(server.url)) == without


def test_sigterm_drains_in_flight_then_exits_cleanly(server: ServerProcess) -> None:
    async def go() -> dict[str, Any]:
        async with connect(server.url) as ws:
            await frames(ws, 1)
            await ws.send(json.dumps({"type": "generate", "id": "last", "prompt": "Hi", "max_tokens": 8,
                                      "ignore_eos": True}))
            assert (await frames(ws, 1))[0]["type"] == "delta"
            server.proc.send_signal(15)
            _, done = await until_done(ws, "last")
            return done

    done = asyncio.run(go())
    assert done["finish_reason"] == "length" and done["usage"]["completion_tokens"] == 8
    assert server.proc.wait(30) == 0
