"""Shared by the benchmark scripts: the W1 prompt recipe, percentiles, where a figure was measured,
and starting a server subprocess. Imports nothing heavy, so load.py runs without torch."""

from __future__ import annotations

import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def w1_requests(n: int, input_len: tuple[int, int], output_len: tuple[int, int],
                seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """docs/benchmarks.md's W1: all prompts first, then all max_tokens, from random.seed(seed). Must stay the
    same draw as offline.py's, so that offline and online figures describe the same requests."""
    rng = random.Random(seed)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(*input_len))] for _ in range(n)]
    max_tokens = [rng.randint(*output_len) for _ in range(n)]
    return prompts, max_tokens


def step_kind(inp: object) -> str:
    """A StepInput's kind: "decode", "mixed" (a prefill step whose first rows decode) or "prefill"."""
    return "decode" if inp.decode else "mixed" if getattr(inp, "decoding", 0) else "prefill"


def pair(s: str) -> tuple[int, int]:
    """'lo,hi' or 'lo:hi' (or one number) for a length range flag; ':' survives device_compare.sh's commas."""
    lo, _, hi = s.replace(":", ",").partition(",")
    return int(lo), int(hi or lo)


def percentiles(xs: Sequence[float], ps: Sequence[int] = (50, 90, 99)) -> dict[str, float]:
    """Nearest-rank-with-interpolation percentiles plus the mean; empty input gives NaNs, so a
    missing series is visible in the JSON rather than silently zero."""
    if not xs:
        return {**{f"p{p}": float("nan") for p in ps}, "mean": float("nan")}
    s = sorted(xs)
    out = {}
    for p in ps:
        k = (len(s) - 1) * p / 100
        lo = int(k)
        hi = min(lo + 1, len(s) - 1)
        out[f"p{p}"] = s[lo] + (s[hi] - s[lo]) * (k - lo)
    out["mean"] = sum(s) / len(s)
    return out


def machine() -> dict[str, str]:
    """What a figure was measured on: CPU model, card (when torch sees one), commit, date."""
    info = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"), "commit": "unknown"}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:  # $COMMIT wins: a copied tree (a GPU machine's) may carry a stale or no .git
        info["commit"] = os.environ.get("COMMIT") or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        pass
    info["cpus"] = str(os.cpu_count())
    if "torch" in sys.modules:  # only when the script already paid for importing it
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            info["card"] = torch.cuda.get_device_name()
    return info


def emit_json(res: dict, dest: str | None) -> None:
    """--json: '-' prints one line to stdout, a path appends one line (JSON Lines)."""
    if dest is None:
        return
    line = json.dumps(res)
    if dest == "-":
        print(line, flush=True)
    else:
        with open(dest, "a") as f:
            f.write(line + "\n")


# ---- a server subprocess -----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text to {name or name{labels}: value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


@dataclass
class Spawned:
    """A server process started by spawn_server (the tests use it too)."""

    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 3000) -> str:
        return self.log()[-n:]

    def metrics(self) -> dict[str, float]:
        return parse_metrics(http_get(self.http + "/metrics")[1])

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
def spawn_server(args: Sequence[str], startup_timeout: float = 600.0, log_path: str | None = None,
                 quiet: bool = False, module: str = "aengine") -> Iterator[Spawned]:
    """`python -m <module> --port <free> *args`, yielded once /health answers 200; SIGTERM after.
    The server's log goes to log_path (kept) or a temporary file (removed)."""
    port = free_port()
    if log_path:
        path = Path(log_path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    else:
        fd, name = tempfile.mkstemp(prefix="aengine-bench-", suffix=".log")
        path = Path(name)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", module, "--port", str(port), *args], cwd=ROOT, env=env,
                            stdout=fd, stderr=subprocess.STDOUT)
    os.close(fd)
    srv = Spawned(proc, port, path)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}:\n{srv.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer /health in {startup_timeout} s:\n{srv.log_tail()}")
            try:
                if http_get(srv.http + "/health", timeout=1.0)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        if not quiet:
            print(f"server up on {srv.url} (pid {proc.pid})", file=sys.stderr)
        yield srv
    finally:
        srv.stop()
        if not log_path:
            path.unlink(missing_ok=True)
