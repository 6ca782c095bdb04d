"""The WebSocket server: one uvloop event loop runs the websockets server and the scheduler
coroutine. Each connection is a Session that multiplexes requests by the client's id; plain
HTTP GET /health and /metrics are answered on the same port."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import itertools
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from aengine.config import EngineConfig, ServerConfig
from aengine.engine import AsyncEngine
from aengine.serve.metrics import Metrics, debug_state
from aengine.serve.protocol import Error, Hello, encode
from aengine.serve.session import Session

log = logging.getLogger("aengine")
# The browser chat page, served at GET / (a WebSocket upgrade on / is still the API).
CHAT_PAGE = (Path(__file__).parent / "static" / "chat.html").read_text(encoding="utf-8")


class Server:
    def __init__(self, engine: AsyncEngine, cfg: ServerConfig, sock: socket.socket | None = None) -> None:
        self.engine, self.cfg, self.sock = engine, cfg, sock  # sock: bound already (run_server), else cfg's port
        self.metrics = Metrics()
        self.sessions: set[Session] = set()
        self.draining = False
        self.failed = False
        self.tokenizing = 0  # requests between their generate frame and the scheduler's queue
        self.tokenizing_bytes = 0  # their generate frames' bytes
        # niced (per thread on Linux): with more tokenizer threads than cores the loop still gets a core at once
        self.tok_pool = ThreadPoolExecutor(4, thread_name_prefix="aengine-tok", initializer=os.nice, initargs=(10,))
        self._numbers = itertools.count()

    @property
    def healthy(self) -> bool:
        return not self.draining and self.engine.healthy

    def process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == "/health":
            ok = self.healthy
            return conn.respond(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE,
                                "ok\n" if ok else "unavailable\n")
        if path == "/metrics":
            return _respond(conn, HTTPStatus.OK, self.metrics.render(self.engine),
                            "text/plain; version=0.0.4; charset=utf-8")
        for name in ("Authorization", "Upgrade"):  # which one would count? refuse rather than guess
            if len(request.headers.get_all(name)) > 1:
                return conn.respond(HTTPStatus.BAD_REQUEST, f"more than one {name} header\n")
        if path in ("/", "/chat") and request.headers.get("Upgrade", "").lower() != "websocket":
            return _respond(conn, HTTPStatus.OK, CHAT_PAGE, "text/html; charset=utf-8")
        if path == "/debug/state" and self.cfg.debug_state:
            state = debug_state(self.engine, len(self.sessions)) | {"tokenizing_bytes": self.tokenizing_bytes}
            return _respond(conn, HTTPStatus.OK, json.dumps(state) + "\n", "application/json")
        if not self._authorized(request.headers, request.path):  # refused before any session exists
            r = conn.respond(HTTPStatus.UNAUTHORIZED, "a valid API key is required\n")
            r.headers["WWW-Authenticate"] = "Bearer"
            return r
        return None  # everything else is the WebSocket endpoint

    def _authorized(self, headers: Headers, path: str) -> bool:
        if not self.cfg.api_key:
            return True
        auth = headers.get("Authorization", "")
        given = auth[7:] if auth[:7].lower() == "bearer " else ""  # the scheme name is case-insensitive
        # Browsers cannot set headers on a WebSocket: they offer the key as a subprotocol
        # "bearer.KEY" next to "aengine" (or, less safely since URLs get logged, ?api_key=KEY).
        for proto in ",".join(headers.get_all("Sec-WebSocket-Protocol")).split(","):
            if proto.strip().startswith("bearer."):
                given = given or proto.strip()[7:]
        given = given or parse_qs(urlsplit(path).query).get("api_key", [""])[0]
        return hmac.compare_digest(given.encode(), self.cfg.api_key.encode())

    async def handler(self, ws: ServerConnection) -> None:
        if len(self.sessions) >= self.cfg.max_connections:
            await ws.send(encode(Error(None, "overloaded", "too many connections")), text=True)
            await ws.close(1013, "too many connections")
            return
        sess = Session(self, ws, next(self._numbers))
        self.sessions.add(sess)
        self.metrics.connections += 1
        sess.send(Hello(self.engine.model_name, self.engine.max_model_len))
        try:
            async for frame in ws:
                if isinstance(frame, bytes):  # protocol v1 is JSON text frames
                    sess.error(None, "invalid_request", "binary frames are not accepted: send JSON text frames")
                    continue
                sess.on_frame(frame)
        except ConnectionClosed:
            pass
        finally:
            sess.close()
            self.sessions.discard(sess)
            self.metrics.connections -= 1

    async def run(self) -> int:
        """Serve until SIGINT/SIGTERM (or an engine fault); returns the process exit status."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        signals = 0

        def on_signal() -> None:
            nonlocal signals
            signals += 1
            stop.set()
            if signals > 1:  # a second Ctrl-C: stop draining
                self.cfg.drain_seconds = 0.0

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        await self.engine.start()
        # Origin is checked for browsers; other clients send none and are let through (None).
        origins = [*self.cfg.allowed_origins, None] if self.cfg.allowed_origins else None
        where = dict(sock=self.sock) if self.sock is not None else dict(host=self.cfg.host, port=self.cfg.port)
        async with serve(self.handler, **where, process_request=self.process_request,
                         origins=origins, compression=None, max_size=self.cfg.max_frame_bytes,
                         write_limit=self.cfg.send_buffer_bytes, select_subprotocol=_select_subprotocol) as server:
            log.info("serving %s on ws://%s:%d", self.engine.model_name, self.cfg.host, self.cfg.port)
            if exposed_without_key(self.cfg):
                log.warning("listening on %s without --api-key: anyone who can reach it can use it", self.cfg.host)
            await asyncio.wait([asyncio.ensure_future(stop.wait()), self.engine.task],
                               return_when=asyncio.FIRST_COMPLETED)
            if self.engine.task.done():  # scheduler fault: its state is not trusted, so say so and exit
                for sess in self.sessions:
                    sess.error(None, "internal", "the engine failed and cannot continue; the server is exiting")
            await self._drain()
            server.close()
            await asyncio.wait_for(server.wait_closed(), timeout=5)
        self.tok_pool.shutdown(wait=False, cancel_futures=True)
        self.metrics.close()
        log.info("stopped")
        return 1 if self.failed else 0

    async def _drain(self) -> None:
        """Refuse new work, let in-flight requests finish for up to drain_seconds, cancel the rest."""
        self.draining = True
        deadline = time.monotonic() + self.cfg.drain_seconds
        log.info("draining %d requests", self.engine.stats().requests)
        while any(s.live for s in self.sessions) and time.monotonic() < deadline and self.cfg.drain_seconds > 0:
            if self.engine.task.done():
                break
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


def _respond(conn: ServerConnection, status: HTTPStatus, body: str, content_type: str) -> Response:
    r = conn.respond(status, body)
    del r.headers["Content-Type"]  # respond() set text/plain; setting again would add a second header
    r.headers["Content-Type"] = content_type
    return r


def _select_subprotocol(conn: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """Select "aengine" when offered: a browser that offers subprotocols (e.g. for its key) fails
    the handshake unless one is selected; the key itself is never echoed."""
    return Subprotocol("aengine") if "aengine" in offered else None


def exposed_without_key(cfg: ServerConfig) -> bool:
    try:
        loopback = ipaddress.ip_address(cfg.host).is_loopback
    except ValueError:
        loopback = cfg.host == "localhost"
    return not loopback and not cfg.api_key


def run_server(engine_cfg: EngineConfig, server_cfg: ServerConfig) -> int:
    """Serve until stopped; returns the exit status. A port that cannot be bound or a model the
    engine refuses is one line on stderr and status 2, and the port comes first: nobody waits for
    a model to load to learn that the port is taken."""
    logging.getLogger("websockets").setLevel(logging.WARNING)  # no line per /health probe
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
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    return run(Server(engine, server_cfg, sock).run())
