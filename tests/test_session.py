"""The server's write path on a real loopback WebSocket: deltas written by the per-turn flush, and
by the writer task while the socket pushes back, must reach the client whole and in order."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from types import SimpleNamespace

from websockets.asyncio.server import serve
from websockets.sync.client import connect

from aengine.config import ServerConfig
from aengine.serve.metrics import Metrics
from aengine.serve.session import Session, Stream
from aengine.types import RequestDelta


def test_frames_in_order_through_backpressure() -> None:
    n, per_turn, pad = 4000, 50, "x" * 2000  # ~8 MB: more than the kernel and websockets buffer
    got: list[str] = []
    seen = {"paused": 0, "handed_over": 0}
    ready = threading.Event()
    port: list[int] = []

    def client() -> None:
        ready.wait()
        with connect(f"ws://127.0.0.1:{port[0]}", compression=None, max_size=None) as ws:
            time.sleep(1.0)  # read nothing at first: the server's socket fills up and pauses
            for _ in range(n):
                got.append(json.loads(ws.recv())["text"])

    async def main() -> None:
        done = asyncio.Event()

        async def handler(ws: object) -> None:
            server = SimpleNamespace(engine=None, metrics=Metrics(), cfg=ServerConfig(send_buffer_bytes=64 << 20))
            sess = Session(server, ws, 0)  # type: ignore[arg-type]
            st = Stream("r", "0:r", True, time.monotonic())
            try:
                for i in range(n):
                    sess._emit(st, RequestDelta([5], f"{i:05d}{pad}"))
                    if i % per_turn == per_turn - 1:
                        await asyncio.sleep(0)  # a scheduler step ends: the flush runs
                        seen["paused"] += ws.paused  # type: ignore[attr-defined]
                        seen["handed_over"] += sess.wake.is_set()
                await sess.flush(30.0)
                await ws.wait_closed()  # type: ignore[attr-defined]
            finally:
                sess.close()
                done.set()

        async with serve(handler, "127.0.0.1", 0, compression=None) as srv:
            port.append(next(iter(srv.sockets)).getsockname()[1])
            t = threading.Thread(target=client, daemon=True)
            t.start()
            ready.set()
            await asyncio.wait_for(done.wait(), 60)
            await asyncio.to_thread(t.join, 30)

    asyncio.run(main())
    assert seen["paused"] > 0 and seen["handed_over"] > 0, f"the socket never pushed back: {seen}"
    assert len(got) == n
    assert [int(t[:5]) for t in got] == list(range(n))
    assert all(t[5:] == pad for t in got)
