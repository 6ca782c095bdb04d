"""The server: one uvloop event loop runs aiohttp and the scheduler coroutine, on one port: protocol v1 (a Session
per WebSocket, any path), OpenAI's API under /v1/ (serve/openai.py), GET /health, /metrics, the chat page at /."""

import asyncio
import gc
import hmac
import ipaddress
import itertools
import logging
import os
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from aengine.config import EngineConfig, ServerConfig
from aengine.engine import AsyncEngine
from aengine.serve.metrics import Metrics, debug_state
from aengine.serve.openai import ApiError, OpenAI
from aengine.serve.protocol import Error, Hello, encode
from aengine.serve.session import Session

log = logging.getLogger("aengine")
# The browser chat page, served at GET / (a WebSocket upgrade on / is still the API).
CHAT_PAGE = (Path(__file__).parent / "static" / "chat.html").read_text(encoding="utf-8")
METRICS = "text/plain; version=0.0.4; charset=utf-8"


class Server:
    def __init__(self, engine: AsyncEngine, cfg: ServerConfig, sock: socket.socket | None = None) -> None:
        self.engine, self.cfg, self.sock = engine, cfg, sock  # sock: bound already (run_server), else cfg's port
        self.metrics = Metrics()
        self.sessions: set[Session] = set()
        self.sockets: set[web.WebSocketResponse] = set()  # every open WebSocket, both protocols
        self.draining = self.failed = False
        self.tokenizing = self.tokenizing_bytes = 0  # requests being tokenized, their frames' bytes (session.Host)
        # niced (per thread on Linux): with more tokenizer threads than cores the loop still gets a core at once
        self.tok_pool = ThreadPoolExecutor(4, thread_name_prefix="aengine-tok", initializer=os.nice, initargs=(10,))
        self._numbers = itertools.count()
        self.openai = OpenAI(self)

    @property
    def healthy(self) -> bool:
        return not self.draining and self.engine.healthy

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        """Every request on the port: one function, so that the order of the checks is plain."""
        path, h = request.path, request.headers
        if path == "/health":
            return web.Response(text="ok\n") if self.healthy else web.Response(status=503, text="unavailable\n")
        if path == "/metrics":
            return web.Response(body=self.metrics.render(self.engine).encode(), headers={"Content-Type": METRICS})
        api = path.startswith("/v1/")
        for name in ("Authorization", "Upgrade"):  # which one would count? refuse rather than guess
            if len(h.getall(name, [])) > 1:
                return _refuse(api, 400, f"more than one {name} header")
        upgrade = h.get("Upgrade", "").lower() == "websocket"
        if path in ("/", "/chat") and not upgrade:
            return web.Response(body=CHAT_PAGE.encode(), headers={"Content-Type": "text/html; charset=utf-8"})
        if path == "/debug/state" and self.cfg.debug_state:
            state = debug_state(self.engine, len(self.sockets)) | {"tokenizing_bytes": self.tokenizing_bytes}
            return web.json_response(state)
        if not self._authorized(request):  # refused before any session exists
            return _refuse(api, 401, "a valid API key is required", headers={"WWW-Authenticate": "Bearer"})
        if api and not upgrade:
            return await self.openai.http(request)
        if not upgrade:
            return _refuse(api, 426, "this is a WebSocket endpoint (protocol v1): send an Upgrade request")
        origin = h.get("Origin")  # browsers send one; programs need not, and are let through
        if self.cfg.allowed_origins and origin is not None and origin not in self.cfg.allowed_origins:
            return _refuse(api, 403, "this Origin is not allowed")
        ws = web.WebSocketResponse(protocols=("aengine",), compress=False, max_msg_size=self.cfg.max_frame_bytes,
                                   heartbeat=20.0, writer_limit=self.cfg.send_buffer_bytes)
        await ws.prepare(request)
        self.sockets.add(ws)
        try:
            if len(self.sockets) > self.cfg.max_connections:
                await ws.send_frame(encode(Error(None, "overloaded", "too many connections")), WSMsgType.TEXT)
                await ws.close(code=1013, message=b"too many connections")
            elif path == "/v1/responses":
                await self.openai.responses_ws(ws)
            else:
                await self.native(ws, request)
        finally:
            self.sockets.discard(ws)
        return ws

    def _authorized(self, request: web.Request) -> bool:
        if not self.cfg.api_key:
            return True
        headers, auth = request.headers, request.headers.get("Authorization", "")
        given = auth[7:] if auth[:7].lower() == "bearer " else ""  # the scheme name is case-insensitive
        # Browsers cannot set headers on a WebSocket: they offer the key as a subprotocol
        # "bearer.KEY" next to "aengine" (or, less safely since URLs get logged, ?api_key=KEY).
        for proto in ",".join(headers.getall("Sec-WebSocket-Protocol", [])).split(","):
            if proto.strip().startswith("bearer."):
                given = given or proto.strip()[7:]
        given = given or request.query.get("api_key", "")
        return hmac.compare_digest(given.encode(), self.cfg.api_key.encode())

    async def native(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        """One connection of protocol v1 (docs/protocol.md)."""
        sess = Session(self, ws, request.transport, next(self._numbers))  # type: ignore[arg-type]
        self.sessions.add(sess)
        self.metrics.connections += 1
        sess.send(Hello(self.engine.model_name, self.engine.max_model_len))
        try:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    sess.on_frame(msg.data)
                elif msg.type is WSMsgType.BINARY:  # protocol v1 is JSON text frames
                    sess.error(None, "invalid_request", "binary frames are not accepted: send JSON text frames")
        finally:
            sess.close()
            self.sessions.discard(sess)
            self.metrics.connections -= 1

    async def run(self) -> int:
        """Serve until SIGINT/SIGTERM (or an engine fault); returns the process exit status."""
        stop = asyncio.Event()

        def on_signal() -> None:
            if stop.is_set():  # a second Ctrl-C: stop draining
                self.cfg.drain_seconds = 0.0
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, on_signal)
        await self.engine.start()
        app = web.Application(client_max_size=self.cfg.max_frame_bytes)
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True)
        await runner.setup()
        sock = self.sock or socket.create_server((self.cfg.host, self.cfg.port))
        await web.SockSite(runner, sock, shutdown_timeout=1.0).start()
        log.info("serving %s on ws://%s:%d (OpenAI API under /v1)", self.engine.model_name, self.cfg.host,
                 self.cfg.port)
        if exposed_without_key(self.cfg):
            log.warning("listening on %s without --api-key: anyone who can reach it can use it", self.cfg.host)
        await asyncio.wait([asyncio.ensure_future(stop.wait()), self.engine.task], return_when=asyncio.FIRST_COMPLETED)
        if self.engine.task.done():  # scheduler fault: its state is not trusted, so say so and exit
            for sess in self.sessions:
                sess.error(None, "internal", "the engine failed and cannot continue; the server is exiting")
        await self._drain()
        await asyncio.wait_for(asyncio.gather(*(ws.close(code=1001, message=b"going away")
                                                for ws in list(self.sockets)), return_exceptions=True), 5)
        await runner.cleanup()
        self.tok_pool.shutdown(wait=False, cancel_futures=True)
        self.metrics.close()
        log.info("stopped")
        return 1 if self.failed else 0

    async def _drain(self) -> None:
        """Refuse new work, let in-flight requests finish for up to drain_seconds, cancel the rest."""
        self.draining = True
        deadline = time.monotonic() + self.cfg.drain_seconds
        log.info("draining %d requests", self.engine.stats().requests)
        busy = lambda: any(s.live for s in self.sessions) or self.openai.live
        while busy() and time.monotonic() < deadline and self.cfg.drain_seconds > 0 and not self.engine.task.done():
            await asyncio.sleep(0.05)
        faulted = self.engine.task.done()  # the clients were told already
        try:
            await self.engine.shutdown()  # aborts what is left: those get done frames with "cancelled"
        except Exception:
            log.exception("the engine stopped after a fault")
            self.failed = True
        if not faulted:  # the last frame before the close (code 1001): why the connection ends
            for s in self.sessions:
                s.error(None, "overloaded", "the server is shutting down")
        await asyncio.gather(*(s.flush(1.0) for s in list(self.sessions)))


def _refuse(api: bool, status: int, message: str, **kw: Any) -> web.Response:
    """A refusal before any request exists: OpenAI's error body under /v1/, a plain line elsewhere."""
    if api:
        return web.json_response({"error": ApiError(status, message).body()}, status=status, **kw)
    return web.Response(status=status, text=message + "\n", **kw)


def exposed_without_key(cfg: ServerConfig) -> bool:
    try:
        loopback = ipaddress.ip_address(cfg.host).is_loopback
    except ValueError:
        loopback = cfg.host == "localhost"
    return not loopback and not cfg.api_key


def run_server(engine_cfg: EngineConfig, server_cfg: ServerConfig) -> int:
    """Serve until stopped; returns the exit status. A port that cannot be bound or a model the engine refuses is
    one line on stderr and status 2; the port comes first: nobody waits for a model to learn that it is taken."""
    try:
        sock = socket.create_server((server_cfg.host, server_cfg.port))
    except OSError as e:
        print(f"aengine: error: cannot listen on {server_cfg.host}:{server_cfg.port}: {e.strerror or e}",
              file=sys.stderr)
        return 2
    server_cfg.port = sock.getsockname()[1]  # the one chosen when --port 0
    try:
        engine = AsyncEngine(engine_cfg)
    except (OSError, ValueError) as e:  # a missing model, a config the engine cannot serve
        sock.close()
        print(f"aengine: error: {e}", file=sys.stderr)
        return 2
    # start-up's ~10^5-10^6 objects live as long as the server: full collections (100-300 ms pauses) now skip them
    gc.collect()
    gc.freeze()
    try:
        from uvloop import run
    except ImportError:  # Windows
        from asyncio import run
    return run(Server(engine, server_cfg, sock).run())
