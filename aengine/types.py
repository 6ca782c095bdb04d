"""The public values above the scheduler: sampling parameters, request deltas and outputs, engine stats, errors."""

import json
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
MAX_N, MAX_TOP_LOGPROBS, MAX_LOGIT_BIAS = 16, 20, 1024


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
    n: int = 1  # completions per prompt; the copies share the prompt's KV
    logprobs: int | None = None  # None: off; k: the sampled token's logprob and the k most likely
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # HF/vLLM's: divides positive, multiplies negative logits (prompt, output)
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    min_tokens: int = 0  # end-of-sequence and stop token ids are masked before this many tokens
    # structured output, at most one: a JSON Schema, a regex the output matches, EBNF, any JSON object
    json_schema: dict | str | None = None
    regex: str | None = None
    grammar: str | None = None
    json: bool = False

    def validate(self) -> None:
        bad = InvalidRequest
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, int | float) or not math.isfinite(self.temperature) or self.temperature < 0:
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
                isinstance(self.stop, list) and all(isinstance(s, str) for s in self.stop)):
            raise bad("stop must be a string or a list of strings")
        # bounded, so that stop matching (per token, per stop string) cannot stall the loop
        if len(self.stop_list) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in self.stop_list):
            raise bad(f"stop takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters")
        if self.stop_token_ids is not None and not all(isinstance(t, int) for t in self.stop_token_ids):
            raise bad("stop_token_ids must be a list of integers")
        if len(self.stop_token_ids or ()) > MAX_STOP_TOKEN_IDS:
            raise bad(f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids")
        if not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            raise bad(f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int)
                                              and 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise bad(f"logprobs (top_logprobs) must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs!r}")
        for name, v in (("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)):
            if not isinstance(v, (int, float)) or not -2 <= v <= 2:
                raise bad(f"{name} must be in [-2, 2], got {v!r}")
        if not isinstance(self.repetition_penalty, (int, float)) or not 0 < self.repetition_penalty <= 10:
            raise bad(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty!r}")
        if self.logit_bias is not None and not (
            isinstance(self.logit_bias, dict) and len(self.logit_bias) <= MAX_LOGIT_BIAS
            and all(isinstance(k, int) and isinstance(v, (int, float)) and -100 <= v <= 100
                    for k, v in self.logit_bias.items())):
            raise bad(f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids to numbers in [-100, 100]")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0 \
                or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise bad(f"min_tokens must be an integer in [0, max_tokens], got {self.min_tokens!r}")
        if not (isinstance(self.json_schema, (dict, str, type(None))) and isinstance(self.json, bool)
                and {type(self.regex), type(self.grammar)} <= {str, type(None)}):
            raise bad("json_schema must be an object or a string, regex and grammar strings, json a boolean")
        if sum(x is not None for x in (self.json_schema, self.regex, self.grammar)) + self.json > 1:
            raise bad("give at most one of json_schema, regex, grammar, json")

    @property
    def constraint(self) -> tuple[str, str] | None:
        """(kind, text) of the structured-output constraint, if any: the grammar cache's key."""
        s = {"type": "object"} if self.json else self.json_schema
        return ("json_schema", s if isinstance(s, str) else json.dumps(s)) if s is not None else \
            next(((k, v) for k, v in (("regex", self.regex), ("grammar", self.grammar)) if v is not None), None)

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


SAMPLING_FIELDS = tuple(SamplingParams.__dataclass_fields__)  # the wire types copy these by name


@dataclass(slots=True)
class TokenLogprob:
    """A generated token's logprob (after penalties and bias, before temperature); `top`: (token id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


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
    index: int = 0  # which of the request's n completions
    logprobs: list[TokenLogprob] | None = None  # one per token when SamplingParams.logprobs is set


@dataclass(slots=True)
class RequestDelta:
    """What a request produced since its last delta; the last one has a finish_reason and the RequestOutput."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    output: RequestOutput | None = None
    index: int = 0  # which of the request's n completions; each one ends with its own last delta
    logprobs: list[TokenLogprob] | None = None  # for token_ids, when SamplingParams.logprobs is set


EmitFn = Callable[[RequestDelta], None]


@dataclass
class EngineStats:
    running: int = 0  # requests admitted to the batch
    waiting: int = 0  # requests queued for admission
    requests: int = 0  # live requests (running, waiting, or just aborted)
    pages_total: int = 0  # KV pages: capacity = free + used + cached
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
