"""Every server limit (docs/reliability.md), each exceeded over a real connection: frame size, live
requests per connection, connections, waiting requests, max_tokens, context length, slow consumers,
and an engine fault that fails only its own step's requests."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import build_tiny
from tests.server_util import ServerProcess, running_server

# The embedded tokenizer (the tiny model dir has none) has 49152 ids, so the model must too.
TINY_VOCAB = 49152
LIMITS = ("--max-model-len", "256", "--max-tokens-limit", "200", "--max-requests-per-connection", "2",
          "--max-connections", "3", "--max-frame-bytes", "8192", "--max-running-requests", "1",
          "--max-waiting-requests", "2", "--send-buffer-bytes", "65536")


def tiny_args(path: Path) -> tuple[str, ...]:
    return ("--model", str(path), "--dtype", "float32", "--device", "cpu")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny("llama", tmp_path_factory.mktemp("tiny"), vocab_size=TINY_VOCAB)


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[ServerProcess]:
    with running_server(*tiny_args(tiny_model), *LIMITS, "--debug-state") as srv:
        yield srv


async def recv(ws: ClientConnection, timeout: float = 30.0) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def hello(url: str, **kw: Any) -> ClientConnection:
    ws = await connect(url, max_size=None, **kw)
    assert (await recv(ws))["type"] == "hello"
    return ws


_terminals: dict[int, dict[str, dict[str, Any]]] = {}  # per connection: terminal frames read, not yet asked for


async def terminal(ws: ClientConnection, rid: str) -> dict[str, Any]:
    """The (first) done or error frame of request rid; those of other ids read meanwhile are kept."""
    seen = _terminals.setdefault(id(ws), {})
    while rid not in seen:
        m = await recv(ws)
        if m["type"] in ("done", "error") and m.get("id") is not None:
            seen.setdefault(m["id"], m)
    return seen.pop(rid)


def gen(rid: str, **kw: Any) -> str:
    return json.dumps({"type": "generate", "id": rid, "prompt": "Count: one, two,", **kw})


LONG = dict(max_tokens=200, ignore_eos=True)  # keeps a request running for a while


def wait_idle(srv: ServerProcess, timeout: float = 30.0) -> dict[str, Any]:
    """/debug/state once no request or connection is left (it is returned either way)."""
    from tests.server_util import http_get

    deadline = time.monotonic() + timeout
    while True:
        st = json.loads(http_get(srv.http + "/debug/state")[1])
        if (st["requests"] == 0 and st["sessions"] == 0) or time.monotonic() > deadline:
            return st
        time.sleep(0.05)


def test_frame_size(server: ServerProcess) -> None:
    async def go() -> tuple[int | None, str]:
        ws = await hello(server.url)
        await ws.send(gen("big", stop=["x" * 9000]))
        with pytest.raises(ConnectionClosed):
            await recv(ws)
        code = ws.close_code
        ws2 = await hello(server.url)  # the server and other connections live on
        await ws2.send(gen("ok", max_tokens=3))
        done = await terminal(ws2, "ok")
        await ws2.close()
        return code, done["type"]

    assert asyncio.run(go()) == (1009, "done")  # 1009: message too big


def test_requests_per_connection(server: ServerProcess) -> None:
    async def go() -> list[dict[str, Any]]:
        async with await hello(server.url) as ws:
            for i in range(3):  # arrive together: the first two are live when the third is read
                await ws.send(gen(f"r{i}", **LONG))
            out = [await terminal(ws, "r2")]
            await ws.send(json.dumps({"type": "cancel", "id": "r0"}))
            await ws.send(json.dumps({"type": "cancel", "id": "r1"}))
            return out + [await terminal(ws, "r0"), await terminal(ws, "r1")]

    err, d0, d1 = asyncio.run(go())
    assert err["code"] == "overloaded" and "per connection" in err["message"]
    assert d0["type"] == d1["type"] == "done"
    assert not wait_idle(server)["problems"]


def test_connections(server: ServerProcess) -> None:
    async def go() -> tuple[dict[str, Any], int | None, str]:
        conns = [await hello(server.url) for _ in range(3)]
        extra = await connect(server.url)
        refused = await recv(extra)
        with pytest.raises(ConnectionClosed):
            await recv(extra)
        await conns.pop().close()
        await asyncio.sleep(0.2)
        again = await hello(server.url)  # a freed place can be taken
        for c in [*conns, again]:
            await c.close()
        return refused, extra.close_code, "ok"

    wait_idle(server)
    refused, code, _ = asyncio.run(go())
    assert refused["type"] == "error" and refused["code"] == "overloaded" and refused["id"] is None
    assert code == 1013


def test_waiting_requests(server: ServerProcess) -> None:
    """--max-running-requests 1 --max-waiting-requests 2: one runs, two wait, the next is refused."""
    async def go() -> list[dict[str, Any]]:
        a, b, c = [await hello(server.url) for _ in range(3)]
        await a.send(gen("run", **LONG))
        assert (await recv(a))["type"] == "delta"  # admitted: running
        await b.send(gen("w1", **LONG))
        await b.send(gen("w2", **LONG))
        await c.send(gen("w3", **LONG))
        refused = await terminal(c, "w3")
        for ws in (a, b, c):
            await ws.close()
        return [refused]

    wait_idle(server)
    (refused,) = asyncio.run(go())
    assert refused["code"] == "overloaded" and "waiting" in refused["message"]
    st = wait_idle(server)
    assert st["requests"] == 0 and not st["problems"]


def test_max_tokens_and_context(server: ServerProcess) -> None:
    async def go() -> list[dict[str, Any]]:
        async with await hello(server.url) as ws:
            out = []
            for rid, kw in [("over", dict(max_tokens=201)),  # above --max-tokens-limit
                            ("dflt", dict(ignore_eos=True)),  # no max_tokens: capped by the limit
                            ("ctx", dict(prompt="", input_ids=list(range(1, 257)))),  # 256 tokens: no room
                            ("sum", dict(input_ids=list(range(1, 101)), max_tokens=157)),
                            ("fits", dict(input_ids=list(range(1, 101)), max_tokens=156, ignore_eos=True))]:
                frame = json.loads(gen(rid, **kw))
                if "input_ids" in kw:
                    del frame["prompt"]
                await ws.send(json.dumps(frame))
                out.append(await terminal(ws, rid))
            return out

    over, dflt, ctx, total, fits = asyncio.run(go())
    assert over["code"] == "invalid_request" and "limit of 200" in over["message"]
    assert dflt["type"] == "done" and dflt["usage"]["completion_tokens"] == 200
    assert ctx["code"] == total["code"] == "context_length_exceeded"
    assert fits["type"] == "done" and fits["usage"]["completion_tokens"] == 156


def _small_rcvbuf_socket(port: int) -> socket.socket:
    """A client socket that buffers little, so a client that stops reading is felt quickly."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    return s


def test_slow_consumer_is_closed_and_others_unharmed(server: ServerProcess) -> None:
    """A client that sends but never reads: two long requests, then cancels for unknown (long) ids,
    each answered by an error frame. Its send buffer fills (--send-buffer-bytes 65536), its
    requests are aborted and it is closed; meanwhile another client is served normally."""
    async def flood(ws: ClientConnection) -> int:
        n = 0
        try:
            for i in range(2):
                await ws.send(gen(f"s{i}", **LONG))
            while n < 20000:
                await ws.send(json.dumps({"type": "cancel", "id": f"{n:08d}" + "x" * 248}))
                n += 1
                if n % 50 == 0:
                    await asyncio.sleep(0.01)
        except ConnectionClosed:
            pass
        return n

    async def go() -> tuple[int, int, float, dict[str, Any]]:
        # max_queue=1: the client library stops reading the socket after one unread frame
        stuck = await connect(server.url, sock=_small_rcvbuf_socket(server.port), max_queue=1)
        t0, served = time.monotonic(), 0
        async with await hello(server.url) as ok:
            flooding = asyncio.create_task(flood(stuck))
            while served < 3 or not flooding.done() and time.monotonic() - t0 < 60:  # during and after
                await ok.send(gen(f"k{served}", max_tokens=2))
                if (await terminal(ok, f"k{served}"))["type"] == "done":
                    served += 1
        sent = await flooding
        stuck.transport.abort()
        return served, sent, time.monotonic() - t0, wait_idle(server)

    served, sent, secs, st = asyncio.run(go())
    assert server.metrics()["aengine_slow_client_closes_total"] >= 1, f"not closed after {sent} frames, {secs:.0f} s"
    assert sent < 20000 and served >= 3
    assert st["requests"] == 0 and not st["problems"], st
    assert "over 65536 unsent bytes; closing it" in server.log()


def test_step_fault_fails_its_requests_only(tiny_model: Path) -> None:
    """The real server with a faulting step (tests/fault_server.py: a prefill holding token 7 raises
    inside the step): that request fails with internal, another one running beside it finishes,
    the server keeps serving; three faulted steps in a row mean the state is not trusted: every
    client is told, exit status 1."""
    bad = json.dumps({"type": "generate", "id": "bad", "input_ids": [5, 6, 7, 8], "max_tokens": 4})

    async def go(srv: ServerProcess) -> list[dict[str, Any]]:
        async with await hello(srv.url) as ws, await hello(srv.url) as other:
            await other.send(gen("long", **LONG))
            assert (await recv(other))["type"] == "delta"
            await ws.send(bad)
            out = [await terminal(ws, "bad"), await terminal(other, "long")]
            await ws.send(gen("after", max_tokens=3))
            out.append(await terminal(ws, "after"))
            for _ in range(3):  # nothing good runs between them now
                await ws.send(bad)
                out.append(await terminal(ws, "bad"))
            out.append(await recv(other))  # the server's last word to every client
            return out

    with running_server(*tiny_args(tiny_model), "--debug-state", module="tests.fault_server") as srv:
        bad1, long, after, *bads, last = asyncio.run(go(srv))
        assert srv.proc.wait(30) == 1
        log = srv.log()
    assert bad1["type"] == "error" and bad1["code"] == "internal"
    assert long["type"] == "done" and long["usage"]["completion_tokens"] == 200
    assert after["type"] == "done"
    assert [b["code"] for b in bads] == ["internal"] * 3
    assert last == {"type": "error", "id": None, "code": "internal",
                    "message": "the engine failed and cannot continue; the server is exiting"}
    assert log.count("injected fault (token 7 in a prefill)") >= 2
    assert log.count("a step failed") == 3  # one traceback per faulted step, not per request
