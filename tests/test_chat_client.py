"""The terminal chat when the server shuts down: it says that the server closed the connection and
why (the server's last frame before closing), and exits with status 1, without a traceback."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import build_tiny
from tests.server_util import ROOT, running_server
from tests.test_limits import TINY_VOCAB, tiny_args


def test_chat_says_why_the_server_went_away(tmp_path: Path) -> None:
    path = build_tiny("llama", tmp_path, vocab_size=TINY_VOCAB)
    with running_server(*tiny_args(path)) as srv:
        chat = subprocess.Popen([sys.executable, "-m", "clients.chat", "--url", srv.url], cwd=ROOT, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            out = ""
            while "connected to" not in out and time.monotonic() < deadline:
                out += chat.stdout.readline()
            assert "connected to" in out, out
            assert srv.stop() == 0  # SIGTERM: the server drains, says why, closes
            chat.wait(timeout=30)  # stdin stays open: the chat must notice the close by itself
            rest, err = chat.stdout.read(), chat.stderr.read()
        finally:
            chat.kill()
    assert chat.returncode == 1, (out, rest, err)
    assert "[the server closed the connection: the server is shutting down]" in rest, (rest, err)
    assert "Traceback" not in err, err


def test_shutdown_cancels_streams_and_says_why_before_closing(tmp_path: Path) -> None:
    """SIGTERM with a live stream: its done frame says cancelled, then the last frame is an
    overloaded error 'the server is shutting down' (id null), then the close code 1001. (Before:
    the connection closed with no word why.)"""
    import asyncio
    import json

    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    path = build_tiny("llama", tmp_path, vocab_size=TINY_VOCAB)
    with running_server(*tiny_args(path), "--drain-seconds", "0.5") as srv:
        async def go() -> tuple[list[dict], int | None]:
            frames: list[dict] = []
            async with connect(srv.url) as ws:
                await ws.recv()
                await ws.send(json.dumps({"type": "generate", "id": "long", "prompt": "Hi", "max_tokens": 400,
                                          "ignore_eos": True}))
                assert json.loads(await ws.recv())["type"] == "delta"
                await asyncio.get_running_loop().run_in_executor(None, srv.stop)
                try:
                    while True:
                        frames.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
                except ConnectionClosed:
                    pass
            return [f for f in frames if f["type"] != "delta"], ws.close_code

        last, code = asyncio.run(go())
    assert [f["type"] for f in last] == ["done", "error"], last
    assert last[0]["finish_reason"] == "cancelled"
    assert last[1] == {"type": "error", "id": None, "code": "overloaded", "message": "the server is shutting down"}
    assert code == 1001
