"""Prometheus text for /metrics: a few counters and histograms; the format is too small to need a client library."""

import asyncio
import bisect
import gc
import itertools
import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aengine.engine import AsyncEngine

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = _LATENCY_BUCKETS) -> None:
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum, self.count = 0.0, 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1

    def render(self) -> list[str]:
        n, les = self.name, (*map(str, self.buckets), "+Inf")
        buckets = (f'{n}_bucket{{le="{le}"}} {c}' for le, c in zip(les, itertools.accumulate(self.counts)))
        return family("histogram", n, self.help, *buckets, f"{n}_sum {self.sum}", f"{n}_count {self.count}")


def family(kind: str, name: str, help: str, *samples: str) -> list[str]:
    return [f"# HELP {name} {help}", f"# TYPE {name} {kind}", *samples]


class Metrics:
    def __init__(self) -> None:
        self.ttft = Histogram("aengine_time_to_first_token_seconds", "Time from request arrival to its first token.")
        self.itl = Histogram("aengine_inter_token_latency_seconds", "Time between consecutive tokens of a request.")
        self.requests: dict[str, int] = {}  # finished requests by finish reason or error code
        self.connections = 0
        self.slow_closes = 0  # connections closed for not reading their frames
        self.gc_pause = Histogram("aengine_gc_full_collection_seconds", "Full (generation 2) garbage collections: "
                                  "each pauses the loop.", (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))
        self._gc_t0 = 0.0
        gc.callbacks.append(self._on_gc)  # a latency tail that lines up with these is GC's (run_server: gc.freeze)

    def _on_gc(self, phase: str, info: dict) -> None:
        if info["generation"] == 2 and phase == "start":
            self._gc_t0 = time.perf_counter()
        elif info["generation"] == 2:
            self.gc_pause.observe(time.perf_counter() - self._gc_t0)

    def close(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def finished(self, reason: str) -> None:
        self.requests[reason] = self.requests.get(reason, 0) + 1

    def render(self, engine: "AsyncEngine") -> str:
        st = engine.stats()
        rows = [  # a name ending in _total is a counter, the rest are gauges
            ("aengine_requests_running", "Requests admitted to the batch.", st.running),
            ("aengine_requests_waiting", "Requests queued for admission.", st.waiting),
            ("aengine_connections", "Open WebSocket connections.", self.connections),
            ("aengine_kv_pages_used", "KV pages held by live requests.", st.pages_used),
            ("aengine_kv_pages_free", "KV pages on the free list.", st.pages_free),
            ("aengine_kv_pages_cached", "KV pages held only by the prefix cache (evictable).", st.pages_cached),
            ("aengine_kv_pages_total", "KV pool capacity in pages.", st.pages_total),
            ("aengine_cache_hit_tokens_total", "Prompt tokens served from the prefix cache.", st.cache_hit_tokens),
            ("aengine_prefill_tokens_total", "Prompt tokens computed.", st.prefill_tokens),
            ("aengine_generated_tokens_total", "Tokens generated.", st.generated_tokens),
            ("aengine_preemptions_total", "Requests preempted for lack of KV pages.", st.preemptions),
            ("aengine_mixed_steps_total", "Prefill steps that also decoded running requests.", st.mixed_steps),
            ("aengine_slow_client_closes_total", "Connections closed because their send buffer was full.",
             self.slow_closes),
            ("aengine_cache_evicted_pages_total", "KV pages evicted from the prefix cache.", st.pages_evicted),
        ]
        out = [x for name, help, v in rows
               for x in family("counter" if name.endswith("_total") else "gauge", name, help, f"{name} {v}")]
        # what the KV pool stores and how much: a label on an info gauge, as Prometheus does for versions
        if hasattr(r := getattr(engine, "runner", None), "kv_cache_dtype"):
            out += family("gauge", "aengine_kv_cache_info", "The KV cache's storage dtype (fp8_e4m3, bfloat16, "
                          "float32, ...).", f'aengine_kv_cache_info{{dtype="{r.kv_cache_dtype}"}} 1')
            out += family("gauge", "aengine_kv_cache_capacity_tokens", "KV pool capacity in tokens (pages times page "
                          "size).", f"aengine_kv_cache_capacity_tokens {r.num_pages * r.page_size}")
        name = "aengine_requests_finished_total"
        out += family("counter", name, "Finished requests by finish reason.",
                      *(f'{name}{{reason="{r}"}} {n}' for r, n in sorted(self.requests.items())))
        out += self.ttft.render() + self.itl.render() + self.gc_pause.render()
        return "\n".join(out) + "\n"


def debug_state(engine: "AsyncEngine", sessions: int) -> dict[str, object]:
    """GET /debug/state (--debug-state): counts and the engine's integrity check, for tests outside the process."""
    st = engine.stats()
    counts = "running waiting requests pages_total pages_free pages_used pages_cached pages_evicted".split()
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        rss = 0
    return {**{k: getattr(st, k) for k in counts}, "sessions": sessions,
            "asyncio_tasks": len(asyncio.all_tasks()), "rss_bytes": rss, "problems": engine.check()}
