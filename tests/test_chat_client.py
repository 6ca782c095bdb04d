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
