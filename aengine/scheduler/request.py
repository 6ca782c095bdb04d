"""A request as the scheduler keeps it (tokens, KV state, progress); callers see only aengine.types values."""

import time
from dataclasses import dataclass, field

from aengine.tokenizer import Detokenizer
from aengine.types import EmitFn, SamplingParams, TokenLogprob

MIN_TEMPERATURE = 1e-5  # below it sampling is greedy (as vLLM's)
MIN_TOP_P = 1e-6  # below it only the most likely token could be kept: greedy
PREFIX_KEY = 64  # tokens: prompts that open alike are prefilled one step apart (scheduler/prefill.py)


@dataclass(eq=False)
class Req:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    detok: Detokenizer
    emit: EmitFn
    max_tokens: int  # resolved against the context length
    matcher: object | None = None  # scheduler/grammar.py; each Req (and copy) advances its own copy
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
    index: int = 0  # which of the request's n completions
    group: "list[Req]" = field(default_factory=list)  # n > 1: all n copies (scheduler.Scheduler._fork)
    logprobs: list[TokenLogprob] | None = None

    def __post_init__(self) -> None:
        self.matcher = self.matcher and self.matcher.deep_copy()
        # the opening tokens that requests sharing a prompt prefix have in common
        self.prefix_key = tuple(self.prompt_ids[:PREFIX_KEY]) if len(self.prompt_ids) > PREFIX_KEY else None
        p = self.params  # whether its rows need batch.py's logit processing: one check per step if not
        self.processed = bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1 or p.logit_bias
                              or p.min_tokens or p.logprobs is not None or self.matcher is not None)
        self.prompt_set = list(set(self.prompt_ids)) if p.repetition_penalty != 1 else []  # its penalty's
        # Sampling runs in float32: 1 / T overflows for T near 1e-38, and a top_p that rounds to 0
        # keeps no token at all. Both limits mean "the most likely token", so they are greedy.
        greedy = p.temperature < MIN_TEMPERATURE or p.top_p < MIN_TOP_P
        self.sampling = (0.0 if greedy else float(p.temperature), 1.0 if greedy else float(p.top_p),
                         max(0, p.top_k), float(p.min_p), -1 if p.seed is None else p.seed)

    @property
    def prefilling(self) -> bool:
        return self.kv_len < len(self.fill_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids
