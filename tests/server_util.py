"""Starting the real server as a subprocess on a free loopback port, for tests: the benchmarks'
spawner (benchmarks/common.py), quiet, with a test-sized start-up timeout."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from benchmarks.common import ROOT, Spawned, free_port, http_get, parse_metrics, spawn_server

ServerProcess = Spawned
__all__ = ["ROOT", "ServerProcess", "free_port", "http_get", "parse_metrics", "running_server"]


@contextmanager
def running_server(*args: str, startup_timeout: float = 240.0, module: str = "aengine") -> Iterator[ServerProcess]:
    """`python -m <module> --port <free> *args`, yielded once GET /health answers 200; stopped after."""
    with spawn_server(args, startup_timeout=startup_timeout, quiet=True, module=module) as srv:
        yield srv
