"""The public values callers above the scheduler see: sampling parameters, what a request
produces (deltas while it runs, one RequestOutput when it ends), engine statistics, and errors."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field


class EngineError(Exception):
    code = "internal"


class InvalidRequest(EngineError, ValueError):
    code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


MAX_STOPS, MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS = 16, 256, 256


@dataclass
class SamplingParams:
    max_tokens: int | None = 16  # None: up to the context length
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False

    def validate(self) -> None:
        bad = InvalidRequest
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise bad(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not (0 < self.top_p <= 1):
            raise bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad(f"top_k must be an integer >= -1 (0 or -1: off), got {self.top_k!r}")
        if not isinstance(self.min_p, (int, float)) or not (0 <= self.min_p <= 1):
            raise bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise bad(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if self.stop is not None and not isinstance(self.stop, str) and not (
            isinstance(self.stop, list) and all(isinstance(s, str) for s in self.stop)
        ):
            raise bad("stop must be a string or a list of strings")
        # bounded, so that stop matching (per token, per stop string) cannot stall the loop
        if len(self.stop_list) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in self.stop_list):
            raise bad(f"stop takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters")
        if self.stop_token_ids is not None and not all(isinstance(t, int) for t in self.stop_token_ids):
            raise bad("stop_token_ids must be a list of integers")
        if self.stop_token_ids is not None and len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise bad(f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids")

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


@dataclass
class RequestOutput:
    """A finished request."""

    id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None  # stop | length | cancelled | error
    prompt_tokens: int
    cached_tokens: int
    prompt_token_ids: list[int] = field(default_factory=list)
    ttft_ms: float = 0.0  # from submission to the first token; 0 when none was generated
    total_ms: float = 0.0  # from submission to the last token


@dataclass(slots=True)
class RequestDelta:
    """What a request produced since its last delta. The last one has a finish_reason and the
    whole RequestOutput."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    output: RequestOutput | None = None


EmitFn = Callable[[RequestDelta], None]


@dataclass
class EngineStats:
    running: int = 0  # requests admitted to the batch
    waiting: int = 0  # requests queued for admission
    requests: int = 0  # live requests (running, waiting, or just aborted)
    # KV pages: capacity = free + used + cached
    pages_total: int = 0
    pages_free: int = 0
    pages_used: int = 0  # held by live requests
    pages_cached: int = 0  # held only by the prefix cache (evictable)
    pages_evicted: int = 0  # ever evicted from the prefix cache
    # counters
    prefill_tokens: int = 0  # prompt tokens computed
    cache_hit_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    finished: int = 0
    mixed_steps: int = 0  # prefill steps that also decoded running requests
