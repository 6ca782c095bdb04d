"""API key and Origin checks on the WebSocket handshake: a refused handshake is answered with an
HTTP status (401 or 403) and never becomes a session; the browser alternative to a header is the
subprotocol pair "aengine, bearer.KEY"."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from aengine.config import ServerConfig
from aengine.serve.server import exposed_without_key
from tests.server_util import ServerProcess, http_get, running_server
from tests.test_limits import TINY_VOCAB, tiny_args

KEY = "s3cret-key"
ORIGIN = "https://chat.example"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    from tests.conftest import build_tiny

    path = build_tiny("llama", tmp_path_factory.mktemp("tiny"), vocab_size=TINY_VOCAB)
    with running_server(*tiny_args(path), "--api-key", KEY, "--allowed-origins", ORIGIN) as srv:
        yield srv


def handshake(srv: ServerProcess, **kw: Any) -> int | str:
    """The HTTP status of a refused handshake, or the subprotocol and first frame of an accepted one."""
    async def go() -> int | str:
        try:
            async with connect(srv.url, **kw) as ws:
                hello = json.loads(await asyncio.wait_for(ws.recv(), 30))
                await ws.send(json.dumps({"type": "generate", "id": "a", "prompt": "Hi", "max_tokens": 2}))
                while json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] != "done":
                    pass
                return f"{ws.subprotocol} {hello['type']}"
        except InvalidStatus as e:
            return e.response.status_code

    return asyncio.run(go())


def bearer(key: str) -> dict[str, Any]:
    return {"additional_headers": {"Authorization": f"Bearer {key}"}}


def test_api_key(server: ServerProcess) -> None:
    assert handshake(server) == 401
    assert handshake(server, **bearer("wrong")) == 401
    assert handshake(server, **bearer(KEY[:-1])) == 401
    assert handshake(server, additional_headers={"Authorization": KEY}) == 401  # no "Bearer "
    assert handshake(server, **bearer(KEY)) == "None hello"
    # the browser way: a subprotocol carries the key, "aengine" is the one selected (never the key)
    assert handshake(server, subprotocols=["aengine", f"bearer.{KEY}"]) == "aengine hello"
    assert handshake(server, subprotocols=["aengine", "bearer.wrong"]) == 401
    m = server.metrics()
    assert m['aengine_requests_finished_total{reason="length"}'] == 2  # only the accepted ones ran
    assert m["aengine_connections"] == 0
    # HTTP endpoints for probes and scrapes stay open
    assert http_get(server.http + "/health") == (200, "ok\n")


def test_origin(server: ServerProcess) -> None:
    assert handshake(server, origin=ORIGIN, **bearer(KEY)) == "None hello"
    assert handshake(server, origin="https://evil.example", **bearer(KEY)) == 403
    assert handshake(server, origin="https://evil.example") in (401, 403)  # refused either way
    assert handshake(server, **bearer(KEY)) == "None hello"  # non-browser clients send no Origin


def test_env_key_and_exposed_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert exposed_without_key(ServerConfig(host="0.0.0.0"))
    assert not exposed_without_key(ServerConfig(host="0.0.0.0", api_key="k"))
    assert not exposed_without_key(ServerConfig(host="127.0.0.1"))
    assert not exposed_without_key(ServerConfig(host="::1"))
    assert not exposed_without_key(ServerConfig(host="localhost"))
    from tests.conftest import build_tiny

    path = build_tiny("llama", tmp_path / "tiny", vocab_size=TINY_VOCAB)
    monkeypatch.setenv("AENGINE_API_KEY", "from-env")
    with running_server(*tiny_args(path), "--host", "0.0.0.0") as srv:  # exposed, but with a key
        assert handshake(srv) == 401
        assert handshake(srv, **bearer("from-env")) == "None hello"
        assert "without --api-key" not in srv.log()
    monkeypatch.delenv("AENGINE_API_KEY")
    with running_server(*tiny_args(path), "--host", "0.0.0.0") as srv:
        assert handshake(srv) == "None hello"
        assert "without --api-key" in srv.log()
