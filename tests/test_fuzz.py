"""Fuzzing the WebSocket front door over real connections: random and malformed frames (bad JSON,
wrong types, huge numbers, NaN, negative counts, unicode edge cases, binary frames, oversized
frames, floods of cancels for unknown ids). Every frame gets exactly one well-formed terminal
answer (an error, or a done for a valid request), never `internal`; the server stays up and a
normal request afterwards succeeds."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from aengine.serve.protocol import ServerMessage
from tests.conftest import build_tiny
from tests.server_util import ServerProcess, http_get, running_server
from tests.test_limits import TINY_VOCAB, tiny_args

FRAME_LIMIT = 65536
COUNTS = {"frames": 0, "errors": 0, "done": 0}
EXPECTED_CODES = {"invalid_request", "context_length_exceeded", "overloaded"}  # never "internal"

UNICODE = ["", "\x00", "\ud800", "\udfff", "\U0010ffff", "\ufeff", "\u202e", "e\u0301", "🦙" * 50, "\uffff",
           "\r\n", "\\", '"', "\u2028"]
HUGE = [2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, -1, -(2**31), 0]
FLOATS = [float("nan"), float("inf"), float("-inf"), 1e308, -1e308, 5e-324, 1e-300, -0.0, 1e300]

scalars = (st.none() | st.booleans() | st.integers() | st.sampled_from(HUGE)
           | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(FLOATS)
           | st.text(max_size=20) | st.sampled_from(UNICODE))
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                          max_size=4), max_leaves=12)
ids = st.text(min_size=0, max_size=300) | st.sampled_from(UNICODE) | json_values
VALID = {  # a plausible value per field, so that many frames get past the parser and into the engine
    "prompt": st.text(max_size=40) | st.sampled_from(UNICODE),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"]),
                                                "content": st.text(max_size=30)}), max_size=3),
    "input_ids": st.lists(st.integers(-2, TINY_VOCAB + 2) | st.sampled_from(HUGE), max_size=20),
    "max_tokens": st.integers(-3, 300) | st.sampled_from(HUGE),
    "temperature": st.floats(-1, 5) | st.sampled_from(FLOATS), "top_p": st.floats(-0.5, 1.5),
    "top_k": st.integers(-3, 60000) | st.sampled_from(HUGE), "min_p": st.floats(-0.5, 1.5),
    "seed": st.integers(-5, 2**64), "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=3),
    "stop_token_ids": st.lists(st.integers(-5, TINY_VOCAB + 5), max_size=4), "ignore_eos": st.booleans(),
    "stream": st.booleans(), "bogus_field": json_values,
}
generate_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["generate", "generate", "cancel", "GENERATE", "", "hello"]) | json_values,
     "id": ids},
    optional={k: v | json_values for k, v in VALID.items()})

plausible = st.fixed_dictionaries(  # mostly valid: these reach the tokenizer, the scheduler and the sampler
    {"type": st.just("generate"), "id": st.text(min_size=1, max_size=20), "prompt": VALID["prompt"]},
    optional={k: v for k, v in VALID.items() if k not in ("prompt", "messages", "input_ids", "bogus_field")})


def dump(obj: Any) -> str:
    return json.dumps(obj)  # NaN and Infinity come out as the non-JSON tokens NaN / Infinity


frames = st.one_of(
    generate_like.map(dump),
    plausible.map(dump),
    json_values.map(dump),
    st.text(max_size=200),  # mostly not JSON
    st.binary(max_size=200),  # binary frames: refused, the protocol is text frames
    generate_like.map(dump).map(lambda s: s[: len(s) // 2]),  # truncated JSON
    st.sampled_from(['{"type":"generate","id":"x","prompt":"a","max_tokens":NaN}',
                     '{"type":"generate","id":"x","prompt":"a","temperature":1e999}',
                     '{"type":"generate","id":"x","prompt":"a","max_tokens":' + "9" * 400 + "}",
                     '{"type":"generate","id":"x","prompt":"\\ud800"}', '{"type":"cancel","id":"x","id":"y"}',
                     '{"type":"generate","id":"x","prompt":"a"' + ",\"top_k\":1" * 500 + "}",
                     "[" * 5000 + "]" * 5000, '{"type":"generate","id":"x","input_ids":[' + "1," * 200 + "1]}"]),
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    path = build_tiny("llama", tmp_path_factory.mktemp("tiny"), vocab_size=TINY_VOCAB)
    with running_server(*tiny_args(path), "--max-model-len", "128", "--max-tokens-limit", "4",
                        "--max-frame-bytes", str(FRAME_LIMIT), "--debug-state") as srv:
        yield srv


async def answer(ws: ClientConnection) -> dict[str, Any]:
    """Read up to the next terminal frame (error, or done); check every frame against the protocol."""
    while True:
        raw = await asyncio.wait_for(ws.recv(), 60)
        msgspec.json.decode(raw, type=ServerMessage)  # well-formed and of a known type
        m = json.loads(raw)
        if m["type"] == "error":
            assert m["code"] in EXPECTED_CODES, m
            COUNTS["errors"] += 1
            return m
        if m["type"] == "done":
            COUNTS["done"] += 1
            return m


class Conn:
    """One connection and one event loop shared by all examples: the connection must live on."""

    def __init__(self, srv: ServerProcess) -> None:
        self.loop = asyncio.new_event_loop()
        self.url, self.log = srv.url, srv.log
        self.ws = self.run(self._open())

    async def _open(self) -> ClientConnection:
        ws = await connect(self.url, max_size=None)
        assert json.loads(await ws.recv())["type"] == "hello"
        return ws

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.run(self.ws.close())
        self.loop.close()


@pytest.fixture(scope="module")
def conn(server: ServerProcess) -> Iterator[Conn]:
    c = Conn(server)
    yield c
    c.close()


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(st.lists(frames, min_size=1, max_size=8))
def test_random_frames_each_get_one_answer(conn: Conn, batch: list[str | bytes]) -> None:
    async def go() -> None:
        for f in batch:
            assert len(f) < FRAME_LIMIT
            try:
                await conn.ws.send(f)
                COUNTS["frames"] += 1
                await answer(conn.ws)
            except ConnectionClosed as e:
                conn.ws = await conn._open()  # so the next examples (and hypothesis' replay) run on
                raise AssertionError(f"frame {f!r} closed the connection: {e}\n{conn.log()[-3000:]}") from None

    conn.run(go())


def test_floods(conn: Conn, server: ServerProcess) -> None:
    """Thousands of frames without waiting: cancels for unknown ids, garbage, and generates mixed
    with cancels for them; each frame still gets its answer (a cancelled request its done)."""
    async def go() -> list[dict[str, Any]]:
        ws = conn.ws
        for i in range(2000):
            await ws.send(json.dumps({"type": "cancel", "id": f"ghost-{i}"}))
            await ws.send("{not json" if i % 2 else b"\x00\xff")
        COUNTS["frames"] += 4000
        out = [await answer(ws) for _ in range(4000)]
        for i in range(32):  # max_tokens 4 at most: cancels may race their done; count answers by id
            await ws.send(json.dumps({"type": "generate", "id": f"g{i}", "prompt": f"{i} is", "ignore_eos": True}))
        COUNTS["frames"] += 32
        seen: dict[str, str] = {}
        while len(seen) < 32:
            m = await answer(ws)
            seen[m["id"]] = m["type"]
        return out + [{"seen": seen}]

    out = conn.run(go())
    assert all(m["code"] == "invalid_request" for m in out[:-1])
    assert sum(1 for m in out[:-1] if m["id"] is not None) == 2000  # a cancel's error names its id
    assert set(out[-1]["seen"].values()) == {"done"}


def test_oversized_frame_closes_only_that_connection(conn: Conn, server: ServerProcess) -> None:
    async def go() -> int | None:
        ws = await connect(server.url, max_size=None)
        await ws.recv()
        await ws.send("x" * (FRAME_LIMIT + 1))
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 30)
        COUNTS["frames"] += 1
        return ws.close_code

    assert conn.run(go()) == 1009


def test_server_still_serves(conn: Conn, server: ServerProcess) -> None:
    """Runs last: a normal request on the fuzzed connection, then the engine's state is clean."""
    async def go() -> dict[str, Any]:
        await conn.ws.send(json.dumps({"type": "generate", "id": "final", "prompt": "Hello", "max_tokens": 4,
                                       "ignore_eos": True}))
        return await answer(conn.ws)

    done = conn.run(go())
    assert done["type"] == "done" and done["usage"]["completion_tokens"] == 4
    assert server.proc.poll() is None
    state = json.loads(http_get(server.http + "/debug/state")[1])
    assert state["requests"] == 0 and not state["problems"], state
    assert COUNTS["frames"] > 5000, COUNTS
    print(f"\nfuzz counts: {COUNTS}")
