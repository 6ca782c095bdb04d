"""Requests: sampling parameters, the per-request state the scheduler keeps, errors, outputs."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aengine.tokenizer import Detokenizer


class EngineError(Exception):
    code = "internal"


class InvalidRequest(EngineError, ValueError):
    code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class Overloaded(EngineError):
    code = "overloaded"


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
        def bad(msg: str) -> InvalidRequest:
            return InvalidRequest(msg)

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
        if self.stop_token_ids is not None and not all(isinstance(t, int) for t in self.stop_token_ids):
            raise bad("stop_token_ids must be a list of integers")

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


@dataclass
class RequestOutput:
    id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None  # stop | length | cancelled
    prompt_tokens: int
    cached_tokens: int
    prompt_token_ids: list[int] = field(default_factory=list)
    ttft_ms: float = 0.0
    total_ms: float = 0.0


PREFIX_KEY = 64  # tokens: prompts that open alike are prefilled one step apart (Scheduler._schedule_prefill)

# (req, new token ids, new text, finish_reason or None)
EmitFn = Callable[["Req", list[int], str, "str | None"], None]


@dataclass(eq=False)
class Req:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    detok: Detokenizer
    emit: EmitFn
    max_tokens: int  # resolved against the context length
    output_ids: list[int] = field(default_factory=list)
    # KV state
    slot: int = 0  # 0: none
    pages: list[int] = field(default_factory=list)
    synced_pages: int = 0  # pages[:synced_pages] are already in the device page table
    kv_len: int = 0  # tokens whose KV is computed or scheduled
    fill_ids: list[int] = field(default_factory=list)  # tokens to prefill (prompt + outputs on resume)
    node: object | None = None  # locked radix node
    cached_tokens: int = 0
    tree_len: int = 0  # leading tokens of this request whose KV the radix tree holds
    pending: int = 0  # sampled tokens in flight, not yet processed
    finish_reason: str | None = None
    t_arrival: float = field(default_factory=time.monotonic)
    t_first: float = 0.0
    t_last: float = 0.0

    def __post_init__(self) -> None:
        # the opening tokens that requests sharing a prompt prefix have in common
        self.prefix_key = tuple(self.prompt_ids[:PREFIX_KEY]) if len(self.prompt_ids) > PREFIX_KEY else None

    @property
    def prefilling(self) -> bool:
        return self.kv_len < len(self.fill_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids
