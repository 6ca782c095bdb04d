"""Async client for the aengine WebSocket protocol v1 (docs/protocol.md). One connection carries
many requests at once; a reader task routes each server frame to its request by id.

    async with await Client.connect("ws://127.0.0.1:8765") as c:
        async for d in c.generate(messages=[{"role": "user", "content": "Hi"}], max_tokens=32):
            print(d["text"], end="", flush=True)
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed


class ServerError(Exception):
    """An error frame from the server (code: invalid_request, context_length_exceeded, ...)."""

    def __init__(self, code: str, message: str, id: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.id = code, message, id


@dataclass
class GenerateResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: dict[str, int] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)


class Client:
    def __init__(self, ws: ClientConnection, hello: dict[str, Any]) -> None:
        self.ws = ws
        self.hello = hello
        self.model: str = hello["model"]
        self.max_context: int = hello["max_context"]
        self._queues: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self._ids = itertools.count()
        self.errors: asyncio.Queue[dict[str, Any]] = asyncio.Queue()  # errors that name no live request
        self.reader = asyncio.create_task(self._read())  # done once the connection is gone

    @classmethod
    async def connect(cls, url: str, api_key: str | None = None, **kw: Any) -> Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        ws = await connect(url, additional_headers=headers, compression=None, max_size=None, **kw)
        hello = json.loads(await ws.recv())
        if hello.get("type") == "error":
            await ws.close()
            raise ServerError(hello["code"], hello["message"])
        return cls(ws, hello)

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                msg = json.loads(frame)
                q = self._queues.get(msg.get("id"))  # type: ignore[arg-type]
                if q is not None:
                    q.put_nowait(msg)
                elif msg.get("type") == "error":
                    self.errors.put_nowait(msg)
        except ConnectionClosed:
            pass
        finally:  # wake every waiting request: the connection is gone
            for q in self._queues.values():
                q.put_nowait({"type": "closed"})

    def close_reason(self) -> str:
        """Why the connection ended: the server's last error frame that named no request (it sends
        one before closing for shutdown), else the close frame's code and reason."""
        last = None
        while not self.errors.empty():
            last = self.errors.get_nowait()
        if last is not None:
            return last["message"]
        code, reason = self.ws.close_code, self.ws.close_reason
        return f"close code {code}" + (f" ({reason})" if reason else "") if code is not None else "no close frame"

    async def send(self, msg: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(msg))

    async def generate(self, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
                       input_ids: list[int] | None = None, id: str | None = None,
                       **sampling: Any) -> AsyncIterator[dict[str, Any]]:
        """Stream a request's delta frames ({"text", "token_ids"}); ends after its done frame, which
        is yielded last (type "done"); with n > 1, after the n-th (frames carry "index" when not 0).
        Sampling fields: those of the generate frame (docs/protocol.md). Raises ServerError on an
        error frame."""
        rid = id if id is not None else f"r{next(self._ids)}"
        if rid in self._queues:
            raise ValueError(f"request id {rid!r} is already live")
        msg: dict[str, Any] = {"type": "generate", "id": rid, **sampling}
        for k, v in (("prompt", prompt), ("messages", messages), ("input_ids", input_ids)):
            if v is not None:
                msg[k] = v
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._queues[rid] = q
        finished, left = False, sampling.get("n", 1)
        try:
            await self.send(msg)
            while True:
                m = await q.get()
                if m["type"] == "error":
                    finished = True
                    raise ServerError(m["code"], m["message"], rid)
                if m["type"] == "closed":
                    finished = True
                    raise ConnectionError("the connection closed during the request")
                left -= m["type"] == "done"
                finished = left == 0
                yield m
                if finished:
                    return
        finally:
            self._queues.pop(rid, None)
            if not finished and not self.ws.close_code:  # the caller stopped early: stop the server too
                try:
                    await self.cancel(rid)
                except ConnectionClosed:
                    pass

    async def complete(self, prompt: str | None = None, **kw: Any) -> GenerateResult:
        """Run a request (n: 1) to the end and return its whole text."""
        text, ids = [], []
        async for m in self.generate(prompt, **kw):
            if m["type"] == "delta":
                text.append(m["text"])
                ids += m["token_ids"]
            else:
                return GenerateResult(m.get("text", "".join(text)), ids, m["finish_reason"], m["usage"],
                                      m["timing"])
        raise ConnectionError("no done frame")

    async def cancel(self, id: str) -> None:
        await self.send({"type": "cancel", "id": id})

    async def close(self) -> None:
        await self.ws.close()
        await self.reader

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
