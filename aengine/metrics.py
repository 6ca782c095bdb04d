"""Prometheus text exposition for /metrics: a few counters and histograms, no client library
(the format is a page of text; a dependency for it is not worth it)."""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aengine.engine.async_engine import AsyncEngine

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = _LATENCY_BUCKETS) -> None:
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        acc = 0
        for le, c in zip((*map(str, self.buckets), "+Inf"), self.counts):
            acc += c
            out.append(f'{self.name}_bucket{{le="{le}"}} {acc}')
        out += [f"{self.name}_sum {self.sum}", f"{self.name}_count {self.count}"]
        return out


class Metrics:
    def __init__(self) -> None:
        self.ttft = Histogram("aengine_time_to_first_token_seconds", "Time from request arrival to its first token.")
        self.itl = Histogram("aengine_inter_token_latency_seconds", "Time between consecutive tokens of a request.")
        self.requests: dict[str, int] = {}  # finished requests by finish reason or error code
        self.connections = 0

    def finished(self, reason: str) -> None:
        self.requests[reason] = self.requests.get(reason, 0) + 1

    def render(self, engine: AsyncEngine) -> str:
        s = engine.scheduler
        kv = engine.kv_usage()
        # Pages the radix cache holds but no request uses are reclaimable, so they count as cached,
        # not used: "used" drops to 0 when no request is live, whatever the cache mode.
        cached = kv["tree_evictable"]
        used = kv["capacity"] - kv["free"] - cached
        gauges = [
            ("aengine_requests_running", "Requests admitted to the batch.", len(s.running)),
            ("aengine_requests_waiting", "Requests queued for admission.", len(s.waiting)),
            ("aengine_connections", "Open WebSocket connections.", self.connections),
            ("aengine_kv_pages_used", "KV pages held by live requests.", used),
            ("aengine_kv_pages_free", "KV pages on the free list.", kv["free"]),
            ("aengine_kv_pages_cached", "KV pages held only by the prefix cache (evictable).", cached),
            ("aengine_kv_pages_total", "KV pool capacity in pages.", kv["capacity"]),
        ]
        st = s.stats
        counters = [
            ("aengine_cache_hit_tokens_total", "Prompt tokens served from the prefix cache.", st.cache_hit_tokens),
            ("aengine_prefill_tokens_total", "Prompt tokens computed.", st.prefill_tokens),
            ("aengine_generated_tokens_total", "Tokens generated.", st.generated_tokens),
            ("aengine_preemptions_total", "Requests preempted for lack of KV pages.", st.preemptions),
            ("aengine_cache_evicted_pages_total", "KV pages evicted from the prefix cache.", kv["evicted"]),
        ]
        out: list[str] = []
        for kind, rows in (("gauge", gauges), ("counter", counters)):
            for name, help, v in rows:
                out += [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {v}"]
        name = "aengine_requests_finished_total"
        out += [f"# HELP {name} Finished requests by finish reason.", f"# TYPE {name} counter"]
        out += [f'{name}{{reason="{r}"}} {n}' for r, n in sorted(self.requests.items())]
        out += self.ttft.render() + self.itl.render()
        return "\n".join(out) + "\n"
