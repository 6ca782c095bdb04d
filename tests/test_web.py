"""The browser chat page (GET /), driven end to end in headless Chromium through playwright-core:
refused without the API key, a streamed answer, a second answer stopped midway, and the server
freeing that request."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server_util import ServerProcess, http_get, running_server

WEB = Path(__file__).parent / "web"
KEY = "s3cret-key"


def _chromium() -> str | None:
    # Debian's /usr/bin/chromium is a wrapper script; the binary behind it takes the same flags.
    for exe in ("/usr/lib/chromium/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if exe and os.access(exe, os.X_OK):
            return exe
    return None


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server("--api-key", KEY) as srv:
        yield srv


def test_chat_page_is_served(server: ServerProcess) -> None:
    status, body = http_get(server.http + "/")
    assert status == 200
    assert "<title>aengine chat</title>" in body and "new WebSocket" in body


def test_chat_in_browser(server: ServerProcess, tmp_path: Path) -> None:
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium is not installed (.ci/run installs it with apt-get)")
    if not (WEB / "node_modules" / "playwright-core").is_dir():
        if shutil.which("npm") is None:
            pytest.skip("npm is not installed (.ci/run installs it with apt-get)")
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=WEB, check=True, timeout=300)
    shot = Path(os.environ.get("AENGINE_CHAT_SCREENSHOT", tmp_path / "chat.png"))
    r = subprocess.run(["node", str(WEB / "chat_e2e.js"), exe, server.http, KEY, str(shot)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:] + "\n" + server.log()[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])

    assert "refused" in out["refused"] and "API key" in out["refused"]
    assert "SmolLM2" in out["status_after_key"] and "SmolLM2" in out["status"]

    # Streamed token by token: the answer grew through several snapshots, each extending the last.
    first = out["first"]
    texts = [s["text"] for s in first["seen"]]
    assert len(texts) >= 3, texts
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), texts
    assert first["seen"][-1]["t"] > first["seen"][0]["t"]
    assert first["text"].strip() and texts[-1] == first["text"]
    assert "TTFT" in first["stats"] and "tokens/s" in first["stats"]

    second = out["second"]
    assert "cancelled" in second["stats"], second
    assert second["text"] and second["stop_disabled"]
    assert shot.stat().st_size > 10_000

    # The stopped request is gone from the batch and its KV pages are back.
    deadline = time.monotonic() + 10
    while True:
        m = server.metrics()
        if m["aengine_requests_running"] == 0 and m["aengine_kv_pages_used"] == 0:
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.1)
    assert m["aengine_requests_waiting"] == 0
    assert m['aengine_requests_finished_total{reason="cancelled"}'] == 1
