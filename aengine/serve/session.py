"""One WebSocket connection: its live requests, multiplexed by the client's ids, and the write
path that coalesces their frames."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from aengine.config import ServerConfig
from aengine.engine import AsyncEngine
from aengine.serve.metrics import Metrics
from aengine.serve.protocol import (
    Cancel,
    Delta,
    Done,
    Error,
    Generate,
    ProtocolError,
    ServerMessage,
    Timing,
    Usage,
    decode,
    encode,
)
from aengine.types import EngineError, RequestDelta, SamplingParams

log = logging.getLogger("aengine")


class Host(Protocol):
    """What sessions share: the server (serve/server.py) is one."""

    engine: AsyncEngine
    cfg: ServerConfig
    metrics: Metrics
    draining: bool  # refusing new requests
    tokenizing: int  # requests between their generate frame and the scheduler's queue
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
    cancelled: bool = False


class Session:
    def __init__(self, server: Host, ws: ServerConnection, no: int) -> None:
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
        elif self.engine.stats().waiting + self.server.tokenizing >= self.server.cfg.max_waiting_requests:
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
            self.engine.check_size(g.prompt, msgs, g.input_ids)  # a hopeless prompt never waits for a thread
            # The tokenizer (a chat template, a long prompt) may take a while: off the loop. Several
            # threads (HF tokenizers releases the GIL), and closing the connection cancels this.
            ids = await asyncio.get_running_loop().run_in_executor(
                self.server.tok_pool, self.engine.encode, g.prompt, msgs, g.input_ids)
            params = self._params(g, len(ids))
            await self.engine.grammars.prepare(params)
            if st.cancelled or self.closed:
                self.live.pop(st.id, None)
                self.send(Done(st.id, "cancelled", Usage(len(ids), 0, 0), Timing(0.0, self._ms(st.t0))))
                return
            self.engine.submit(st.rid, ids, params, lambda d: self._emit(st, d))
            st.submitted = True
            st.t_submit = time.monotonic()
        except EngineError as e:
            self._fail(st, e.code, str(e))
        except ValueError as e:  # e.g. a tokenizer without a chat template
            self._fail(st, "invalid_request", str(e))
        except asyncio.CancelledError:  # the connection closed: its queued tokenization is dropped
            self.live.pop(st.id, None)
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
                              ignore_eos=g.ignore_eos, json_schema=g.json_schema, regex=g.regex, grammar=g.grammar,
                              json=g.json)

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
            m = self.server.metrics
            if st.t_last:
                m.itl.observe(now - st.t_last)
            else:
                m.ttft.observe(now - st.t0)
            st.t_last = now
        if st.stream and (d.token_ids or d.text):
            self.send(Delta(st.id, d.text, d.token_ids))
        if d.finish_reason is None:
            return
        self.live.pop(st.id, None)
        if d.finish_reason == "error":
            self._fail(st, "internal", "the engine failed while running this request")
            return
        self.server.metrics.finished(d.finish_reason)
        out = d.output
        # the engine times from submission; the client waited since its frame arrived
        ttft = round(out.ttft_ms + (st.t_submit - st.t0) * 1e3, 3) if out.ttft_ms else 0.0
        self.send(Done(st.id, d.finish_reason, Usage(out.prompt_tokens, len(out.token_ids), out.cached_tokens),  # type: ignore[arg-type]
                       Timing(ttft, self._ms(st.t0)), None if st.stream else out.text))

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
