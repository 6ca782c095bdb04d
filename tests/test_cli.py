"""Bad flags at start-up: one line on stderr, exit status 2, before any model loads (a port that is
taken is found before loading too). Each case runs the real `python -m aengine`."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tests.server_util import ROOT

BAD = [
    (["--port", "99999"], "argument --port: 99999 is outside [0, 65535]"),
    (["--tp", "0"], "argument --tp: 0 is outside"),
    (["--tp", "-1"], "argument --tp: -1 is outside"),
    (["--attn", "bogus"], "argument --attn: 'bogus' is not"),
    (["--attn", "fi,fi,fi"], "argument --attn: 'fi,fi,fi' is not"),
    (["--model", "/nonexistent"], "argument --model: '/nonexistent' does not exist"),
    (["--max-prefill-tokens", "0"], "argument --max-prefill-tokens: 0 is outside"),
    (["--gpu-memory-utilization", "1.5"], "argument --gpu-memory-utilization: 1.5 is outside"),
    (["--max-waiting-bytes", "0"], "argument --max-waiting-bytes: 0 is outside"),
    (["--max-waiting-bytes-per-connection", "-1"], "argument --max-waiting-bytes-per-connection: -1 is outside"),
    (["--kv-cache-dtype", "int4"], "argument --kv-cache-dtype: invalid choice"),
    (["--piecewise-cuda-graph-max-tokens", "-1"], "argument --piecewise-cuda-graph-max-tokens: -1 is outside"),
    (["--tp", "2"], "--tp 2 does not divide the model's 9 attention heads"),  # the embedded model: 9 heads
]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aengine", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def one_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("aengine: error: "), (r.returncode, r.stderr)
    return lines[0]


@pytest.mark.parametrize(("args", "says"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_flag_is_one_line_and_status_2(args: list[str], says: str) -> None:
    assert says in one_line(run("--port", "0", *args) if "--port" not in args else run(*args))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda() -> None:
    assert "no CUDA device is available" in one_line(run("--device", "cuda"))


def test_port_in_use_is_found_before_the_model_loads() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        # flags that would start three rank processes: the port is checked before anything loads
        line = one_line(run("--port", str(port), "--load-format", "dummy", "--tp", "3"))
    assert f"cannot listen on 127.0.0.1:{port}" in line and "in use" in line
