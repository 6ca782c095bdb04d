"""OpenAI's API on the same engine (docs/openai.md): /v1/models, /v1/chat/completions, /v1/completions and
/v1/responses over HTTP, and the Responses WebSocket mode. msgspec Structs validate a body while it is parsed."""

import asyncio
import contextlib
import itertools
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

import msgspec
from aiohttp import WSMsgType, web

from aengine.serve.protocol import wire_fields
from aengine.serve.session import Host, capped_max_tokens
from aengine.types import SAMPLING_FIELDS, EngineError, RequestDelta, SamplingParams, TokenLogprob

SSE = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}  # server-sent events


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code

    def body(self) -> dict:  # OpenAI's error object
        kind = {401: "authentication_error", 429: "rate_limit_error"}.get(self.status, "invalid_request_error")
        return {"message": str(self), "type": kind if self.status < 500 else "server_error", "param": None,
                "code": self.code}


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: str
    content: str | list[dict[str, Any]] | None = None  # a string, or parts: their "text" is read
    name: str | None = None
    type: Literal["message"] = "message"  # the Responses API's input items carry it


# Every endpoint's fields, typos refused: SamplingParams' own (vLLM's and SGLang's extensions under their names:
# top_k, min_p, ...) less those each endpoint names its own way (logprobs) or response_format sets; plus OpenAI's.
Sampling = msgspec.defstruct(
    "Sampling", [("model", str | None, None), ("stream", bool, False), ("user", str | None, None),
                 ("stream_options", dict[str, bool] | None, None),  # {"include_usage": true}
                 ("response_format", dict[str, Any] | None, None)]  # structured output: see OpenAI._params
    + [f for f in wire_fields() if f[0] not in ("logprobs", "json_schema", "regex", "grammar", "json")],
    forbid_unknown_fields=True, kw_only=True, module=__name__)


class ChatRequest(Sampling, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None


class CompletionRequest(Sampling, kw_only=True):
    prompt: str | list[int]
    max_tokens: int | None = 16  # OpenAI's default for this endpoint
    logprobs: int | None = None


class ResponsesRequest(Sampling, kw_only=True):
    input: str | list[ChatMessage]
    instructions: str | None = None
    max_output_tokens: int | None = None
    top_logprobs: int | None = None
    text: dict[str, Any] | None = None  # the Responses API's place for the output format


class WsCreate(ResponsesRequest, tag="response.create", tag_field="type"):  # the WebSocket mode's events
    stream_id: str | None = None  # the lane: its responses run one after the other, and echo it


class WsCancel(msgspec.Struct, forbid_unknown_fields=True, tag="response.cancel", tag_field="type"):
    response_id: str | None = None
    stream_id: str | None = None


def _text(content: str | list[dict[str, Any]] | None) -> str | None:
    return content if isinstance(content, str) or content is None else "".join(str(p.get("text", "")) for p in content)


def _decode(body: bytes | str, kind: Any) -> Any:
    try:
        return msgspec.json.decode(body, type=kind)
    except (msgspec.DecodeError, RecursionError) as e:  # ValidationError says which field ($.n, ...)
        raise ApiError(400, f"invalid request: {e}", "invalid_request") from None


class Job:  # one request in the engine: the deltas of its n completions arrive on q
    def __init__(self, rid: str, n: int) -> None:
        self.rid, self.n, self.q = rid, n, asyncio.Queue[RequestDelta]()
        self.text: dict[int, list[str]] = defaultdict(list)
        self.logprobs: dict[int, list[TokenLogprob]] = defaultdict(list)
        self.done: dict[int, RequestDelta] = {}  # completion index -> its last delta

    async def next(self) -> RequestDelta:
        d = await self.q.get()
        self.text[d.index].append(d.text)
        self.logprobs[d.index].extend(d.logprobs or [])
        if d.finish_reason is not None:
            self.done[d.index] = d
            if d.finish_reason == "error":
                raise ApiError(500, "the engine failed while running this request", "internal")
        return d

    def usage(self, p: str = "prompt", c: str = "completion") -> dict:  # the Responses API says input, output
        outs = [d.output for d in self.done.values() if d.output is not None]
        np, nc = outs[0].prompt_tokens if outs else 0, sum(len(o.token_ids) for o in outs)
        return {f"{p}_tokens": np, f"{c}_tokens": nc, "total_tokens": np + nc,
                f"{p}_tokens_details": {"cached_tokens": max((o.cached_tokens for o in outs), default=0)}}


class OpenAI:
    def __init__(self, server: Host) -> None:
        self.server, self.engine = server, server.engine
        self.live = 0  # requests in the engine: the server drains them like protocol v1's
        self._ids = itertools.count()

    def _params(self, r: Sampling, n_prompt: int) -> SamplingParams:
        """The one place where an OpenAI request becomes the engine's SamplingParams."""
        fmt = r.response_format or ((r.text or {}).get("format") if isinstance(r, ResponsesRequest) else None) or {}
        kind = fmt.get("type", "text")
        spec = fmt.get("json_schema", fmt) if kind == "json_schema" else {}  # chat nests it; Responses does not
        if kind not in ("text", "json_object", "json_schema") or (kind == "json_schema" and "schema" not in spec):
            raise ApiError(400, f"response format {kind!r} is not supported (text, json_object, json_schema "
                                "with a schema)", "invalid_request")
        # max_tokens and logprobs under each endpoint's names
        max_tokens = getattr(r, "max_completion_tokens", None) or getattr(r, "max_output_tokens", None) or r.max_tokens
        logprobs = r.logprobs if isinstance(r, CompletionRequest) else getattr(r, "top_logprobs", None)
        if isinstance(r, ChatRequest):
            logprobs = (logprobs or 0) if r.logprobs else None
        if any(not 0 <= t < self.engine.hf_config.vocab_size for t in r.logit_bias or {}):
            raise ApiError(400, "logit_bias holds a token id outside the vocabulary", "invalid_request")
        mt = capped_max_tokens(self.server, max_tokens, n_prompt)
        return SamplingParams(**{**{k: getattr(r, k) for k in SAMPLING_FIELDS if k in Sampling.__struct_fields__},
                                 "max_tokens": mt, "logprobs": logprobs, "json": kind == "json_object",
                                 "json_schema": spec.get("schema")})

    @contextlib.asynccontextmanager
    async def _submit(self, r: Sampling) -> AsyncIterator[Job]:
        srv, eng = self.server, self.engine
        if r.model not in (None, eng.model_name):
            raise ApiError(404, f"the model {r.model!r} does not exist; this server serves {eng.model_name!r}",
                           "model_not_found")
        if srv.draining:
            raise ApiError(503, "the server is shutting down", "overloaded")
        if eng.stats().waiting + srv.tokenizing >= srv.cfg.max_waiting_requests:
            raise ApiError(429, "too many requests are waiting; retry later", "overloaded")
        prompt = ids = msgs = None
        if isinstance(r, ChatRequest):
            msgs = [{"role": m.role, "content": _text(m.content)} for m in r.messages]
        elif isinstance(r, CompletionRequest):
            prompt, ids = (r.prompt, None) if isinstance(r.prompt, str) else (None, r.prompt)
        elif isinstance(r, ResponsesRequest):
            msgs = [{"role": "system", "content": r.instructions}] if r.instructions is not None else []
            msgs += [{"role": "user", "content": r.input}] if isinstance(r.input, str) else \
                [{"role": m.role, "content": _text(m.content)} for m in r.input]
        srv.tokenizing += 1
        try:
            eng.check_size(prompt, msgs, ids)
            ids = await asyncio.get_running_loop().run_in_executor(srv.tok_pool, eng.encode, prompt, msgs, ids)
            job = Job(f"oa{next(self._ids)}", r.n)
            params = self._params(r, len(ids))
            await eng.grammars.prepare(params)  # a response_format's grammar compiles off the loop
            eng.submit(job.rid, ids, params, job.q.put_nowait)
        except (EngineError, ValueError) as e:  # ValueError: a max_tokens over the server's limit, no chat template
            raise ApiError(400, str(e), e.code if isinstance(e, EngineError) else "invalid_request") from None
        finally:
            srv.tokenizing -= 1
        self.live += 1
        try:
            yield job
        finally:
            self.live -= 1
            if len(job.done) < job.n:  # the client went away, or a write failed: free its KV within a step
                self.engine.abort(job.rid)
            for d in job.done.values():
                self.server.metrics.finished(d.finish_reason or "error")

    def _logprobs(self, lps: list[TokenLogprob]) -> list[dict]:
        one = lambda t, lp: {"token": (s := self.engine.tokenizer.decode([t])), "logprob": lp,
                             "bytes": list(s.encode())}
        return [{**one(x.token_id, x.logprob), "top_logprobs": [one(t, lp) for t, lp in x.top]} for x in lps]

    async def http(self, request: web.Request) -> web.StreamResponse:
        try:
            if request.path == "/v1/models":
                card = {"id": self.engine.model_name, "object": "model", "created": 0, "owned_by": "aengine",
                        "max_model_len": self.engine.max_model_len}
                return web.json_response({"object": "list", "data": [card]})
            kind = {"/v1/chat/completions": ChatRequest, "/v1/completions": CompletionRequest,
                    "/v1/responses": ResponsesRequest}.get(request.path)
            if kind is None or request.method != "POST":
                raise ApiError(404, f"no endpoint {request.method} {request.path}", "not_found")
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise ApiError(413, f"the body is over {self.server.cfg.max_frame_bytes} bytes", "too_large") from None
            async with self._submit(r := _decode(body, kind)) as job:  # the request in the engine while it runs
                return await (self._responses if kind is ResponsesRequest else self._completions)(request, r, job)
        except ApiError as e:
            return web.json_response({"error": e.body()}, status=e.status)
        except ConnectionError:  # the client went away mid-stream: _submit aborts the request
            return web.Response()

    def _choice(self, r: Sampling, i: int, text: str, lps: list[TokenLogprob], finish: str | None, chunk: bool) -> dict:
        c = {"index": i, "finish_reason": {"cancelled": "abort"}.get(finish, finish)}  # "abort": vLLM's word
        if isinstance(r, CompletionRequest):
            rows = self._logprobs(lps) if r.logprobs is not None else None
            return {**c, "text": text, "logprobs": None if rows is None else {
                "tokens": [x["token"] for x in rows], "token_logprobs": [x["logprob"] for x in rows],
                "top_logprobs": [{t["token"]: t["logprob"] for t in x["top_logprobs"]} for x in rows],
                "text_offset": list(itertools.accumulate([len(x["token"]) for x in rows], initial=0))[:-1]}}
        return {**c, ("delta" if chunk else "message"): {"role": "assistant", "content": text},
                "logprobs": {"content": self._logprobs(lps), "refusal": None} if r.logprobs else None}  # type: ignore

    async def _completions(self, request: web.Request, r: Sampling, job: Job) -> web.StreamResponse:
        kind = "text_completion" if isinstance(r, CompletionRequest) else f"chat.completion{'.chunk' * r.stream}"
        head = {"id": f"{'cmpl' if kind == 'text_completion' else 'chatcmpl'}-{job.rid}", "object": kind,
                "created": int(time.time()), "model": self.engine.model_name}
        if not r.stream:
            while len(job.done) < job.n:
                await job.next()
            choices = [self._choice(r, i, "".join(job.text[i]), job.logprobs[i], job.done[i].finish_reason, False)
                       for i in sorted(job.done)]
            return web.json_response({**head, "choices": choices, "usage": job.usage()})
        await (resp := web.StreamResponse(headers=SSE)).prepare(request)
        usage = (r.stream_options or {}).get("include_usage", False)
        head |= {"usage": None} if usage else {}
        try:
            while len(job.done) < job.n:
                if (d := await job.next()).text or d.finish_reason or d.logprobs:
                    c = self._choice(r, d.index, d.text, d.logprobs or [], d.finish_reason, True)
                    await resp.write(b"data: %s\n\n" % msgspec.json.encode({**head, "choices": [c]}))
            if usage:
                await resp.write(b"data: %s\n\n" % msgspec.json.encode({**head, "choices": [], "usage": job.usage()}))
        except ApiError as e:
            await resp.write(b"data: %s\n\n" % msgspec.json.encode({"error": e.body()}))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def _responses(self, request: web.Request, r: ResponsesRequest, job: Job) -> web.StreamResponse:
        if not r.stream:  # collect the events (sleep(0, x): an awaitable for send); the last holds the response
            events: list[dict] = []
            await self._respond(r, job, lambda e: asyncio.sleep(0, events.append(e)))
            return web.json_response(events[-1]["response"])
        await (resp := web.StreamResponse(headers=SSE)).prepare(request)
        await self._respond(r, job, lambda e: resp.write(b"event: %s\ndata: %s\n\n" % (e["type"].encode(),
                                                                                       msgspec.json.encode(e))))
        return resp

    async def _respond(self, r: ResponsesRequest, job: Job, send: Callable[[dict], Awaitable[None]]) -> None:
        """Runs one response to its end as the events of OpenAI's Responses streaming."""
        seq, status, error, output, rid = itertools.count(), "in_progress", None, [], f"resp_{job.rid}"
        lane = {"stream_id": r.stream_id} if isinstance(r, WsCreate) and r.stream_id is not None else {}
        where = {"item_id": f"msg_{job.rid}", "output_index": 0, "content_index": 0}

        async def emit(kind: str, **kw: Any) -> None:
            await send({"type": kind, "sequence_number": next(seq), **kw, **lane})

        def response() -> dict:
            return {"id": rid, "object": "response", "created_at": time.time(), "status": status, "error": error,
                    "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                    "instructions": r.instructions, "max_output_tokens": r.max_output_tokens, "output": output,
                    "model": self.engine.model_name, "parallel_tool_calls": False, "temperature": r.temperature,
                    "top_p": r.top_p, "tool_choice": "none", "tools": [],
                    "usage": job.usage("input", "output") if job.done else None}

        await emit("response.created", response=response())
        await emit("response.in_progress", response=response())
        item = {"id": where["item_id"], "type": "message", "role": "assistant", "status": "in_progress", "content": []}
        await emit("response.output_item.added", output_index=0, item=item)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        await emit("response.content_part.added", **where, part=part)
        try:
            while len(job.done) < job.n:
                if (d := await job.next()).text or d.logprobs:
                    await emit("response.output_text.delta", **where, delta=d.text,
                               logprobs=self._logprobs(d.logprobs or []))
        except ApiError as e:
            status, error = "failed", {"code": "server_error", "message": str(e)}
            return await emit("response.failed", response=response())
        part |= {"text": "".join(job.text[0]), "logprobs": self._logprobs(job.logprobs[0])}
        await emit("response.output_text.done", **where, text=part["text"], logprobs=part["logprobs"])
        await emit("response.content_part.done", **where, part=part)
        status = {"stop": "completed", "length": "incomplete"}.get(job.done[0].finish_reason, "cancelled")  # type: ignore
        output.append(item | {"status": "completed" if status == "completed" else "incomplete", "content": [part]})
        await emit("response.output_item.done", output_index=0, item=output[0])
        await emit("response.completed" if status == "completed" else "response.incomplete", response=response())

    async def responses_ws(self, ws: web.WebSocketResponse) -> None:
        """The Responses WebSocket mode: each response.create runs as its own task, FIFO per stream_id
        lane (lanes run side by side); response.cancel stops one by its response_id or lane."""
        lanes: defaultdict[str | None, asyncio.Lock] = defaultdict(asyncio.Lock)  # a Lock wakes waiters FIFO
        tasks: set[asyncio.Task] = set()
        running: dict[str, tuple[str | None, Job]] = {}  # response id -> (lane, job)
        seq = itertools.count()
        send = lambda e: ws.send_frame(msgspec.json.encode(e), WSMsgType.TEXT)

        async def fail(e: ApiError, lane: str | None) -> None:  # the SDK reads code/message; OpenAI nests them
            await send({**e.body(), "type": "error", "sequence_number": next(seq), "status": e.status,
                        "error": e.body(), **({"stream_id": lane} if lane is not None else {})})

        async def run(r: WsCreate) -> None:
            async with lanes[r.stream_id]:
                try:
                    async with self._submit(r) as job:  # cancelled with the socket too: it aborts the request
                        running[rid := f"resp_{job.rid}"] = (r.stream_id, job)
                        try:
                            await self._respond(r, job, send)
                        finally:
                            running.pop(rid)
                except ApiError as e:
                    await fail(e, r.stream_id)
                except ConnectionError:  # the socket closed mid-response
                    pass

        try:
            async for msg in ws:
                try:
                    if msg.type is not WSMsgType.TEXT:
                        raise ApiError(400, "send JSON text frames", "invalid_request")
                    if isinstance(c := _decode(msg.data, WsCreate | WsCancel), WsCancel):
                        for rid, (lane, job) in running.items():
                            if rid == c.response_id or (c.response_id is None and lane == c.stream_id):
                                self.engine.abort(job.rid)
                    elif c.stream:
                        raise ApiError(400, "stream is HTTP-only: every WebSocket response streams", "invalid_request")
                    else:
                        tasks.add(task := asyncio.ensure_future(run(c)))
                        task.add_done_callback(tasks.discard)
                except ApiError as e:
                    await fail(e, None)
        finally:
            for t in tasks:
                t.cancel()

