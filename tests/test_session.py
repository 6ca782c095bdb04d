"""The server's write path on a real loopback WebSocket: deltas written by the writer task once per
loop turn, also while the socket pushes back, must reach the client whole and in order."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from types import SimpleNamespace

from aiohttp import web
from websockets.sync.client import connect

from aengine.config import ServerConfig
from aengine.serve.metrics import Metrics
from aengine.serve.session import Session, Stream
from aengine.types import RequestDelta


def test_frames_in_order_through_backpressure() -> None:
    n, per_turn, pad = 4000, 50, "x" * 2000  # ~8 MB: more than the kernel and websockets buffer
    got: list[str] = []
    seen = {"buffered": 0, "backlog": 0}
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

        async def handler(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse(compress=False)
            await ws.prepare(request)
            server = SimpleNamespace(engine=None, metrics=Metrics(), cfg=ServerConfig(send_buffer_bytes=64 << 20))
            sess = Session(server, ws, request.transport, 0)  # type: ignore[arg-type]
            st = Stream("r", "0:r", True, time.monotonic())
            try:
                for i in range(n):
                    sess._emit(st, RequestDelta([5], f"{i:05d}{pad}"))
                    if i % per_turn == per_turn - 1:
                        await asyncio.sleep(0)  # a scheduler step ends: the flush runs
                        seen["buffered"] += request.transport.get_write_buffer_size() > 0  # type: ignore[union-attr]
                        seen["backlog"] += bool(sess.outbox)  # the writer waits for the socket to drain
                await sess.flush(30.0)
                async for _ in ws:  # until the client closes
                    pass
            finally:
                sess.close()
                done.set()
            return ws

        app = web.Application()
        app.router.add_get("/", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port.append(runner.addresses[0][1])
        t = threading.Thread(target=client, daemon=True)
        t.start()
        ready.set()
        await asyncio.wait_for(done.wait(), 60)
        await asyncio.to_thread(t.join, 30)
        await runner.cleanup()

    asyncio.run(main())
    assert seen["buffered"] > 0 and seen["backlog"] > 0, f"the socket never pushed back: {seen}"
    assert len(got) == n
    assert [int(t[:5]) for t in got] == list(range(n))
    assert all(t[5:] == pad for t in got)
