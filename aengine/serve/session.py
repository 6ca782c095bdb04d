"""One WebSocket connection: its live requests, multiplexed by the client's ids; a write path coalescing frames."""

import asyncio
import ctypes
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from aiohttp import WSMsgType
from aiohttp.web import WebSocketResponse

from aengine.config import ServerConfig
from aengine.engine import AsyncEngine
from aengine.serve import protocol
from aengine.serve.metrics import Metrics
from aengine.serve.protocol import Cancel, Delta, Done, Error, Generate, ProtocolError, ServerMessage, Timing, Usage
from aengine.tokenizer import StopMatcher
from aengine.types import MAX_STOPS, SAMPLING_FIELDS, EngineError, RequestDelta, SamplingParams

log = logging.getLogger("aengine")
# glibc keeps what tokenizer threads freed (docs/reliability.md)
_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)


class Host(Protocol):
    """What sessions share: the server (serve/server.py) is one."""

    engine: AsyncEngine
    cfg: ServerConfig
    metrics: Metrics
    draining: bool  # refusing new requests
    tokenizing: int  # requests between their generate frame and the scheduler's queue
    tokenizing_bytes: int  # their generate frames' bytes
    tok_pool: ThreadPoolExecutor


@dataclass(eq=False)
class Stream:
    """One live request of a session, from its generate frame to its done (or error) frame."""

    id: str
    rid: str  # the engine's id: unique across connections
    stream: bool
    t0: float  # arrival of the generate frame
    t_last: float = 0.0  # last token, for inter-token latency
    t_submit: float = 0.0  # handed to the engine (after tokenization)
    submitted: bool = False  # False while its prompt is being tokenized
    left: int = 1  # completions not finished (n)
    cancelled: bool = False
    held: int = 0  # its frame's bytes while it counts as tokenizing (Session._hold)


def capped_max_tokens(server: Host, max_tokens: int | None, n_prompt: int) -> int | None:
    """max_tokens under the server's --max-tokens-limit: the default is capped, a larger ask refused."""
    limit = server.cfg.max_tokens_limit
    if limit and max_tokens is None:
        return max(1, min(limit, server.engine.max_model_len - n_prompt))
    if limit and max_tokens > limit:  # type: ignore[operator]
        raise ValueError(f"max_tokens ({max_tokens}) is above this server's limit of {limit}")
    return max_tokens


class Session:
    def __init__(self, server: Host, ws: WebSocketResponse, transport: asyncio.Transport, no: int) -> None:
        self.server, self.engine, self.ws, self.transport, self.no = server, server.engine, ws, transport, no
        self.live: dict[str, Stream] = {}
        self.tasks: set[asyncio.Task] = set()
        # one writer task per connection, woken once per loop turn (docs/architecture.md, "Frames out")
        self.outbox: list[bytes] = []
        self.queued = 0  # bytes in outbox
        self.wake, self.closed = asyncio.Event(), False
        self.tokenizing_bytes = 0  # this connection's share of server.tokenizing_bytes
        self.writer = asyncio.create_task(self._write_loop())

    def send(self, msg: ServerMessage) -> None:
        if self.closed:
            return
        frame = protocol.encode(msg)
        self.outbox.append(frame)
        self.queued += len(frame)
        self.wake.set()
        try:
            buffered = self.transport.get_write_buffer_size()
        except Exception:  # a transport closing under us: this runs in the scheduler's emit, never raise
            buffered = 0
        if self.queued + buffered > self.server.cfg.send_buffer_bytes:
            self._too_slow()

    def _too_slow(self) -> None:
        """A client reads slower than its requests produce: bound its memory by aborting them and closing it."""
        log.warning("connection %d: over %d unsent bytes; closing it", self.no, self.server.cfg.send_buffer_bytes)
        self.server.metrics.slow_closes += 1
        self.close()
        self.outbox, self.queued = [], 0
        # the close frame goes behind what is buffered; a client that never reads won't see it
        task = asyncio.ensure_future(self.ws.close(code=1008, message=b"client too slow: send buffer full"))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        asyncio.get_running_loop().call_later(1.0, self.transport.abort)

    def error(self, id: str | None, code: str, message: str) -> None:
        self.send(Error(id, code, message))  # type: ignore[arg-type]

    async def _write_loop(self) -> None:
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                frames, self.outbox, self.queued = self.outbox, [], 0
                for f in frames:  # awaits only when the socket pushes back (aiohttp's drain)
                    await self.ws.send_frame(f, WSMsgType.TEXT)
        except (ConnectionError, RuntimeError) as e:  # the connection closed under us
            log.debug("connection %d: write failed: %s", self.no, e)

    async def flush(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (self.outbox or self.wake.is_set()) and not self.writer.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def on_frame(self, frame: str | bytes) -> None:
        try:
            msg = protocol.decode(frame)
        except ProtocolError as e:
            self.error(e.id, "invalid_request", str(e))
            return
        if isinstance(msg, Cancel):
            self.cancel(msg.id)
        elif msg.id in self.live:
            self.error(msg.id, "invalid_request", f"request id {msg.id!r} is already live on this connection")
        elif self.server.draining:
            self.error(msg.id, "overloaded", "the server is shutting down")
        elif len(self.live) >= self.server.cfg.max_requests_per_connection:
            self.error(msg.id, "overloaded", f"at most {self.server.cfg.max_requests_per_connection} "
                                             f"live requests per connection")
        elif self.engine.stats().waiting + self.server.tokenizing >= self.server.cfg.max_waiting_requests:
            self.error(msg.id, "overloaded", "too many requests are waiting; retry later")
        elif self.tokenizing_bytes + len(frame) > self.server.cfg.max_waiting_bytes_per_connection or \
                self.server.tokenizing_bytes + len(frame) > self.server.cfg.max_waiting_bytes:
            self.error(msg.id, "overloaded", "too many prompt bytes are waiting to be tokenized; retry later")
        else:
            self.live[msg.id] = st = Stream(msg.id, f"{self.no}:{msg.id}", msg.stream, time.monotonic(), left=msg.n,
                                            held=len(frame))
            self._hold(len(frame))  # not yet in the scheduler's queue, but it will be
            self.tasks.add(task := asyncio.create_task(self._start(st, msg)))
            # a done callback, not a finally: a task cancelled before it starts never runs its body
            task.add_done_callback(lambda t: (self.tasks.discard(t), self._release(st)))

    def _hold(self, n: int) -> None:
        """Count a request and its frame's bytes from its generate frame until it is queued or refused."""
        self.server.tokenizing += 1 if n > 0 else -1
        self.server.tokenizing_bytes += n
        self.tokenizing_bytes += n
        if n <= -(1 << 18) and not self.server.tokenizing and not self.server.draining and _TRIM is not None:
            self.server.tok_pool.submit(_TRIM, 0)  # a big prompt left and the tokenizer is idle

    def _release(self, st: Stream) -> None:
        """st no longer counts as tokenizing: it is queued (counted as waiting from then on) or refused."""
        if st.held:
            self._hold(-st.held)
            st.held = 0

    def cancel(self, id: str) -> None:
        if (st := self.live.get(id)) is None:
            self.error(id, "invalid_request", f"no live request with id {id!r}")
        elif st.submitted:
            self.engine.abort(st.rid)  # its done frame comes from the scheduler's emit
        else:
            st.cancelled = True  # still tokenizing: _start answers instead of submitting

    async def _start(self, st: Stream, g: Generate) -> None:
        try:
            msgs = [{"role": m.role, "content": m.content} for m in g.messages] if g.messages is not None else None
            self.engine.check_size(g.prompt, msgs, g.input_ids)  # a hopeless prompt never waits for a thread
            # off the loop, on several threads; closing the connection cancels this (docs/reliability.md)
            ids = await asyncio.get_running_loop().run_in_executor(self.server.tok_pool, self._encode, g, msgs)
            params = SamplingParams(**{**{k: getattr(g, k) for k in SAMPLING_FIELDS},
                                       "max_tokens": capped_max_tokens(self.server, g.max_tokens, len(ids))})
            await self.engine.grammars.prepare(params)  # compiles off the loop (cached by its text)
            if st.cancelled or self.closed:
                self.live.pop(st.id, None)
                self.send(Done(st.id, "cancelled", Usage(len(ids), 0, 0), Timing(0.0, self._ms(st.t0))))
                return
            self._release(st)  # in the scheduler's queue from here: counted there, not twice until the task ends
            self.engine.submit(st.rid, ids, params, lambda d: self._emit(st, d))
            st.submitted, st.t_submit = True, time.monotonic()
        except (EngineError, ValueError) as e:  # ValueError: e.g. a tokenizer without a chat template
            self._fail(st, e.code if isinstance(e, EngineError) else "invalid_request", str(e))
        except asyncio.CancelledError:  # the connection closed: its queued tokenization is dropped
            self.live.pop(st.id, None)
        except Exception as e:
            log.exception("request %s failed", st.rid)
            self._fail(st, "internal", f"{type(e).__name__}: {e}")

    def _encode(self, g: Generate, msgs: list[dict] | None) -> list[int]:  # on a tokenizer thread
        StopMatcher(([g.stop] if isinstance(g.stop, str) else g.stop or [])[:MAX_STOPS])  # tables cached, off the loop
        return self.engine.encode(g.prompt, msgs, g.input_ids)

    def _fail(self, st: Stream, code: str, message: str) -> None:
        self.live.pop(st.id, None)
        self.server.metrics.finished(code)
        self.error(st.id, code, message)

    @staticmethod
    def _ms(t0: float) -> float:
        return round((time.monotonic() - t0) * 1e3, 3)

    def _emit(self, st: Stream, d: RequestDelta) -> None:
        """Called by the scheduler, on the loop, for every processed token and at the finish."""
        now = time.monotonic()
        if d.token_ids:
            (self.server.metrics.itl if st.t_last else self.server.metrics.ttft).observe(now - (st.t_last or st.t0))
            st.t_last = now
        if st.stream and (d.token_ids or d.text) and st.left:
            self.send(Delta(st.id, d.text, d.token_ids, d.index, d.logprobs))
        if d.finish_reason is None or not st.left:
            return
        st.left -= 1
        if d.finish_reason == "error":  # one error frame ends all n
            st.left = 0
            self._fail(st, "internal", "the engine failed while running this request")
            return
        if not st.left:
            self.live.pop(st.id, None)
        self.server.metrics.finished(d.finish_reason)
        out = d.output
        # the engine times from submission; the client waited since its frame arrived
        ttft = round(out.ttft_ms + (st.t_submit - st.t0) * 1e3, 3) if out.ttft_ms else 0.0
        self.send(Done(st.id, d.finish_reason, Usage(out.prompt_tokens, len(out.token_ids), out.cached_tokens),  # type: ignore[arg-type]
                       Timing(ttft, self._ms(st.t0)), None if st.stream else out.text, d.index,
                       None if st.stream else out.logprobs))

    def close(self) -> None:
        """The connection is gone: abort its requests so their KV is freed within a step."""
        self.closed = True
        for st in self.live.values():
            if st.submitted:
                self.engine.abort(st.rid)
            st.cancelled = True
        self.live.clear()
        self.writer.cancel()
        for task in self.tasks:  # requests still waiting for the tokenizer: nobody wants them now
            task.cancel()
