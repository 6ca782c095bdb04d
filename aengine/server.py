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
import signal
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.typing import Subprotocol

from aengine.config import EngineConfig, ServerConfig
from aengine.engine.async_engine import AsyncEngine
from aengine.metrics import Metrics, debug_state
from aengine.protocol import (
    Cancel,
    Delta,
    Done,
    Error,
    Generate,
    Hello,
    ProtocolError,
    ServerMessage,
    Timing,
    Usage,
    decode,
    encode,
)
from aengine.scheduler.request import EngineError, Req, SamplingParams

log = logging.getLogger("aengine")
# The browser chat page, served at GET / (a WebSocket upgrade on / is still the API).
CHAT_PAGE = (Path(__file__).parent / "static" / "chat.html").read_text(encoding="utf-8")


@dataclass(eq=False)
class Stream:
    """One live request of a session, from its generate frame to its done (or error) frame."""

    id: str
    rid: str  # the engine's id: unique across connections
    stream: bool
    t0: float  # arrival of the generate frame
    t_last: float = 0.0  # last token, for inter-token latency
    submitted: bool = False  # False while its prompt is being tokenized
    cancelled: bool = False


class Session:
    def __init__(self, server: Server, ws: ServerConnection, no: int) -> None:
        self.server, self.engine, self.ws, self.no = server, server.engine, ws, no
        self.live: dict[str, Stream] = {}
        self.tasks: set[asyncio.Task] = set()
        # Frames are queued by the scheduler's emit callbacks and written once per loop turn, so a
        # step that produces deltas for many streams of this connection goes out in one write. The
        # write is a plain callback (no task switch per frame); only when the socket pushes back
        # does the writer task take over, to await websockets' drain.
        self.outbox: list[bytes] = []
        self.queued = 0  # bytes in outbox
        self.flush_pending = False
        self.loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        self.closed = False
        self.writer = asyncio.create_task(self._write_loop())

    # ---- sending ---------------------------------------------------------------------------
    def send(self, msg: ServerMessage) -> None:
        if self.closed:
            return
        frame = encode(msg)
        self.outbox.append(frame)
        self.queued += len(frame)
        if not self.flush_pending:
            self.flush_pending = True
            self.loop.call_soon(self._flush)
        try:
            buffered = self.ws.transport.get_write_buffer_size()
        except Exception:  # a transport closing under us: this runs in the scheduler's emit, never raise
            buffered = 0
        if self.queued + buffered > self.server.cfg.send_buffer_bytes:
            self._too_slow()

    def _too_slow(self) -> None:
        """The client reads slower than its requests produce: bound the memory it can pin by
        aborting its requests and closing it (docs/reliability.md, slow consumers)."""
        log.warning("connection %d: over %d unsent bytes; closing it", self.no, self.server.cfg.send_buffer_bytes)
        self.server.metrics.slow_closes += 1
        self.close()
        self.outbox, self.queued = [], 0
        ws = self.ws
        try:  # the close frame goes behind what is buffered; a client that never reads won't see it
            ws.protocol.send_close(1008, "client too slow: send buffer full")
            ws.send_data()
        except Exception:
            pass
        asyncio.get_running_loop().call_later(1.0, ws.transport.abort)

    def error(self, id: str | None, code: str, message: str) -> None:
        self.send(Error(id, code, message))  # type: ignore[arg-type]

    def _flush(self) -> None:
        self.flush_pending = False
        ws = self.ws
        if not self.outbox or self.closed:
            return
        if ws.paused or self.wake.is_set() or ws.protocol.state is not State.OPEN:
            self.wake.set()  # the writer awaits the drain (or sees the close), keeping the order
            return
        try:
            self._put()
        except Exception as e:  # the connection broke between the check and the write: it is closing
            log.debug("connection %d: write failed: %s", self.no, e)

    def _put(self) -> None:
        """Everything queued, in one socket write."""
        frames, self.outbox, self.queued = self.outbox, [], 0
        for f in frames:
            self.ws.protocol.send_text(f)
        self.ws.transport.write(b"".join(self.ws.protocol.data_to_send()))

    async def _write_loop(self) -> None:
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                if self.outbox:
                    async with self.ws.send_context():  # checks the state; drains after the write
                        self._put()
        except ConnectionClosed:
            pass

    async def flush(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (self.outbox or self.wake.is_set() or self.flush_pending) and not self.writer.done() \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    # ---- receiving -------------------------------------------------------------------------
    def on_frame(self, frame: str | bytes) -> None:
        try:
            msg = decode(frame)
        except ProtocolError as e:
            self.error(e.id, "invalid_request", str(e))
            return
        if isinstance(msg, Cancel):
            self.cancel(msg.id)
            return
        if msg.id in self.live:
            self.error(msg.id, "invalid_request", f"request id {msg.id!r} is already live on this connection")
        elif self.server.draining:
            self.error(msg.id, "overloaded", "the server is shutting down")
        elif len(self.live) >= self.server.cfg.max_requests_per_connection:
            self.error(msg.id, "overloaded", f"at most {self.server.cfg.max_requests_per_connection} "
                                             f"live requests per connection")
        elif len(self.engine.scheduler.waiting) + self.server.tokenizing >= self.server.cfg.max_waiting_requests:
            self.error(msg.id, "overloaded", "too many requests are waiting; retry later")
        else:
            st = Stream(msg.id, f"{self.no}:{msg.id}", msg.stream, time.monotonic())
            self.live[msg.id] = st
            self.server.tokenizing += 1  # not yet in the scheduler's queue, but it will be
            task = asyncio.create_task(self._start(st, msg))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def cancel(self, id: str) -> None:
        st = self.live.get(id)
        if st is None:
            self.error(id, "invalid_request", f"no live request with id {id!r}")
        elif st.submitted:
            self.engine.abort(st.rid)  # its done frame comes from the scheduler's emit
        else:
            st.cancelled = True  # still tokenizing: _start answers instead of submitting

    async def _start(self, st: Stream, g: Generate) -> None:
        try:
            msgs = [{"role": m.role, "content": m.content} for m in g.messages] if g.messages is not None else None
            # The tokenizer (a chat template, a long prompt) may take a while: off the loop.
            ids = await asyncio.get_running_loop().run_in_executor(
                self.server.tok_pool, self.engine.encode, g.prompt, msgs, g.input_ids)
            if st.cancelled or self.closed:
                self.live.pop(st.id, None)
                self.send(Done(st.id, "cancelled", Usage(len(ids), 0, 0), Timing(0.0, self._ms(st.t0))))
                return
            self.engine.submit(st.rid, ids, self._params(g, len(ids)), lambda *a: self._emit(st, *a))
            st.submitted = True
        except EngineError as e:
            self._fail(st, e.code, str(e))
        except ValueError as e:  # e.g. a tokenizer without a chat template
            self._fail(st, "invalid_request", str(e))
        except Exception as e:
            log.exception("request %s failed", st.rid)
            self._fail(st, "internal", f"{type(e).__name__}: {e}")
        finally:
            self.server.tokenizing -= 1

    def _params(self, g: Generate, n_prompt: int) -> SamplingParams:
        max_tokens, limit = g.max_tokens, self.server.cfg.max_tokens_limit
        if limit:
            if max_tokens is None:
                max_tokens = max(1, min(limit, self.engine.max_model_len - n_prompt))
            elif max_tokens > limit:
                raise ValueError(f"max_tokens ({max_tokens}) is above this server's limit of {limit}")
        return SamplingParams(max_tokens=max_tokens, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                              min_p=g.min_p, seed=g.seed, stop=g.stop, stop_token_ids=g.stop_token_ids,
                              ignore_eos=g.ignore_eos)

    def _fail(self, st: Stream, code: str, message: str) -> None:
        self.live.pop(st.id, None)
        self.server.metrics.finished(code)
        self.error(st.id, code, message)

    @staticmethod
    def _ms(t0: float) -> float:
        return round((time.monotonic() - t0) * 1e3, 3)

    def _emit(self, st: Stream, req: Req, ids: list[int], text: str, fin: str | None) -> None:
        """Called by the scheduler, on the loop, for every processed token and at the finish."""
        now = time.monotonic()
        if ids:
            m = self.server.metrics
            if st.t_last:
                m.itl.observe(now - st.t_last)
            else:
                m.ttft.observe(now - st.t0)
            st.t_last = now
        if st.stream and (ids or text):
            self.send(Delta(st.id, text, ids))
        if fin is None:
            return
        self.live.pop(st.id, None)
        if fin == "error":
            self._fail(st, "internal", "the engine failed while running this request")
            return
        self.server.metrics.finished(fin)
        ttft = round((req.t_first - st.t0) * 1e3, 3) if req.t_first else 0.0
        self.send(Done(st.id, fin, Usage(len(req.prompt_ids), len(req.output_ids), req.cached_tokens),  # type: ignore[arg-type]
                       Timing(ttft, self._ms(st.t0)), None if st.stream else req.detok.text))

    def close(self) -> None:
        """The connection is gone: abort its requests so their KV is freed within a step."""
        self.closed = True
        for st in self.live.values():
            if st.submitted:
                self.engine.abort(st.rid)
            st.cancelled = True
        self.live.clear()
        self.writer.cancel()


class Server:
    def __init__(self, engine: AsyncEngine, cfg: ServerConfig) -> None:
        self.engine, self.cfg = engine, cfg
        self.metrics = Metrics()
        self.sessions: set[Session] = set()
        self.draining = False
        self.failed = False
        self.tokenizing = 0  # requests between their generate frame and the scheduler's queue
        self.tok_pool = ThreadPoolExecutor(1, thread_name_prefix="aengine-tok")
        self._numbers = itertools.count()

    @property
    def healthy(self) -> bool:
        return not self.draining and self.engine.task is not None and not self.engine.task.done()

    def process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == "/health":
            ok = self.healthy
            return conn.respond(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE,
                                "ok\n" if ok else "unavailable\n")
        if path == "/metrics":
            r = conn.respond(HTTPStatus.OK, self.metrics.render(self.engine))
            r.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
            return r
        if path in ("/", "/chat") and request.headers.get("Upgrade", "").lower() != "websocket":
            r = conn.respond(HTTPStatus.OK, CHAT_PAGE)
            r.headers["Content-Type"] = "text/html; charset=utf-8"
            return r
        if path == "/debug/state" and self.cfg.debug_state:
            r = conn.respond(HTTPStatus.OK, json.dumps(debug_state(self.engine, len(self.sessions))) + "\n")
            r.headers["Content-Type"] = "application/json"
            return r
        if not self._authorized(request.headers, request.path):  # refused before any session exists
            r = conn.respond(HTTPStatus.UNAUTHORIZED, "a valid API key is required\n")
            r.headers["WWW-Authenticate"] = "Bearer"
            return r
        return None  # everything else is the WebSocket endpoint

    def _authorized(self, headers: Headers, path: str) -> bool:
        if not self.cfg.api_key:
            return True
        auth = headers.get("Authorization", "")
        given = auth[7:] if auth.startswith("Bearer ") else ""
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
        async with serve(self.handler, self.cfg.host, self.cfg.port, process_request=self.process_request,
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
        sched = self.engine.scheduler
        deadline = time.monotonic() + self.cfg.drain_seconds
        log.info("draining %d requests", sched.num_requests)
        while any(s.live for s in self.sessions) and time.monotonic() < deadline and self.cfg.drain_seconds > 0:
            if self.engine.task.done():
                break
            await asyncio.sleep(0.05)
        try:
            await self.engine.shutdown()  # aborts what is left: those get done frames with "cancelled"
        except Exception:
            log.exception("the engine stopped after a fault")
            self.failed = True
        await asyncio.gather(*(s.flush(1.0) for s in list(self.sessions)))


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
    logging.getLogger("websockets").setLevel(logging.WARNING)  # no line per /health probe
    engine = AsyncEngine(engine_cfg)
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    return run(Server(engine, server_cfg).run())
