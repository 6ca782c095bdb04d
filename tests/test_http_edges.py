"""HTTP and frame edge cases on a real server: duplicate Authorization or Upgrade headers are a
400 (not a 500 with a traceback), the Bearer scheme is case-insensitive, /metrics has one
Content-Type, binary frames get an error and the connection lives on, and an error never echoes
an id longer than the protocol's 256 characters."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from tests.server_util import ServerProcess, running_server
from tests.test_limits import TINY_VOCAB, tiny_args

KEY = "k3y"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    from tests.conftest import build_tiny

    path: Path = build_tiny("llama", tmp_path_factory.mktemp("tiny"), vocab_size=TINY_VOCAB)
    with running_server(*tiny_args(path), "--api-key", KEY) as srv:
        yield srv


def raw(srv: ServerProcess, path: str, *headers: str) -> tuple[int, list[str]]:
    """Status and header lines of one raw HTTP/1.1 GET (headers exactly as given, duplicates too)."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(("\r\n".join([f"GET {path} HTTP/1.1", "Host: 127.0.0.1", *headers]) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head = data.split(b"\r\n\r\n")[0].decode().split("\r\n")
    return int(head[0].split()[1]), head[1:]


UPGRADE = ["Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
           "Sec-WebSocket-Version: 13"]


def test_duplicate_headers_are_400(server: ServerProcess) -> None:
    status, _ = raw(server, "/", *UPGRADE, f"Authorization: Bearer {KEY}", f"Authorization: Bearer {KEY}")
    assert status == 400
    status, _ = raw(server, "/", *UPGRADE, "Upgrade: websocket", f"Authorization: Bearer {KEY}")
    assert status == 400
    assert "Traceback" not in server.log()
    assert raw(server, "/health")[0] == 200  # and the server lives on


def test_bearer_is_case_insensitive(server: ServerProcess) -> None:
    assert raw(server, "/", *UPGRADE, f"Authorization: bearer {KEY}")[0] == 101
    assert raw(server, "/", *UPGRADE, f"Authorization: BEARER {KEY}")[0] == 101
    assert raw(server, "/", *UPGRADE, "Authorization: bearer wrong")[0] == 401


def test_metrics_has_one_content_type(server: ServerProcess) -> None:
    status, headers = raw(server, "/metrics")
    types = [h for h in headers if h.lower().startswith("content-type:")]
    assert status == 200 and types == ["Content-Type: text/plain; version=0.0.4; charset=utf-8"], headers


def test_binary_frames_and_long_ids(server: ServerProcess) -> None:
    async def go() -> list[dict]:
        async with connect(server.url, additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
            await ws.recv()  # hello
            await ws.send(json.dumps({"type": "generate", "id": "a", "prompt": "Hi", "max_tokens": 2}).encode())
            first = json.loads(await asyncio.wait_for(ws.recv(), 30))
            await ws.send(json.dumps({"type": "generate", "id": "x" * 300, "prompt": "Hi"}))
            second = json.loads(await asyncio.wait_for(ws.recv(), 30))
            await ws.send(json.dumps({"type": "generate", "id": "b", "prompt": "Hi", "max_tokens": 2}))
            while (m := json.loads(await asyncio.wait_for(ws.recv(), 30)))["type"] != "done":
                pass
            return [first, second, m]

    binary, long_id, done = asyncio.run(go())
    assert binary["type"] == "error" and binary["code"] == "invalid_request" and "binary" in binary["message"]
    assert long_id["type"] == "error" and long_id["id"] is None
    assert done["id"] == "b"  # the connection lived on
