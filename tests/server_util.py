"""Starting the real server as a subprocess on a free loopback port, for tests (and benchmarks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text to {name or name{labels}: value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics(self) -> dict[str, float]:
        return parse_metrics(http_get(self.http + "/metrics")[1])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then the exit status (killed with SIGKILL if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextmanager
def running_server(*args: str, startup_timeout: float = 240.0) -> Iterator[ServerProcess]:
    """`python -m aengine --port <free> *args`, yielded once GET /health answers 200; stopped after."""
    port = free_port()
    fd, log = tempfile.mkstemp(prefix="aengine-server-", suffix=".log")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "aengine", "--port", str(port), *args], cwd=ROOT, env=env,
                            stdout=fd, stderr=subprocess.STDOUT)
    os.close(fd)
    srv = ServerProcess(proc, port, Path(log))
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}:\n{srv.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer /health in {startup_timeout} s:\n{srv.log()[-3000:]}")
            try:
                if http_get(srv.http + "/health", timeout=1.0)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        yield srv
    finally:
        srv.stop()
        Path(log).unlink(missing_ok=True)
