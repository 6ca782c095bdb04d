"""Structured output (llguidance): a constraint compiles once per text (off the event loop, bounded
in size and time) into a cached matcher. Each step, a worker thread advances the matchers by the
tokens just sampled and fills the next step's masks (llguidance's threads, without the GIL) while
the loop thread turns the same tokens into text and the step's forward runs on the device."""

import asyncio
import functools
import importlib
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import torch

from aengine.scheduler.request import Req
from aengine.tokenizer import Tokenizer
from aengine.types import InvalidRequest, SamplingParams

MAX_CHARS, TIMEOUT_S, CACHED = 1 << 16, 10.0, 256


class Grammars:
    def __init__(self, tokenizer: Tokenizer, vocab: int, eos: int, threads: int = 0) -> None:
        self.tokenizer, self.vocab, self.eos = tokenizer, max(vocab, len(tokenizer)), eos  # dummy models: less
        # llguidance's default is 80 % of the CPUs it sees (up to 32), which may be the host's, not
        # this process's: more threads than cores starve the loop thread, which launches every step
        self.threads = threads or max(1, min(16, len(os.sched_getaffinity(0)) - 4))
        self.tok, self.ex = None, llguidance.LLExecutor(self.threads)  # tokenizer: built on first use (~1 s)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="aengine-grammar")  # compiles
        self.stepper = ThreadPoolExecutor(1, thread_name_prefix="aengine-masks")  # never behind a compile
        self.compile = functools.lru_cache(CACHED)(self._compile)  # by text; a refusal is not cached

    def _compile(self, key: tuple[str, str]) -> object:
        kind, text = key
        if len(text) > MAX_CHARS:
            raise InvalidRequest(f"the {kind} is longer than {MAX_CHARS} characters")
        # imported here: llguidance.hf imports transformers' generation modules (seconds of start-up)
        self.tok = self.tok or importlib.import_module("llguidance.hf").from_tokenizer(
            self.tokenizer.hf, n_vocab=self.vocab, eos_token=self.eos)
        try:  # compact JSON: a small model allowed free whitespace may emit nothing else
            g = llguidance.LLMatcher.grammar_from_json_schema(text, defaults={"whitespace_flexible": False}) \
                if kind == "json_schema" else llguidance.grammar_from("ebnf" if kind == "grammar" else kind, text)
            m = llguidance.LLMatcher(self.tok, g, log_level=0)
        except ValueError as e:
            raise InvalidRequest(f"invalid {kind}: {e}") from None
        if m.is_error():
            raise InvalidRequest(f"invalid {kind}: {m.get_error()}")
        return m

    async def prepare(self, params: SamplingParams) -> None:
        """Compile params' constraint in a thread unless cached; InvalidRequest if it is invalid."""
        if (key := params.constraint) is not None:
            fut = asyncio.get_running_loop().run_in_executor(self.pool, self.compile, key)
            try:
                await asyncio.wait_for(fut, TIMEOUT_S)
            except asyncio.TimeoutError:
                raise InvalidRequest(f"the {key[0]} took longer than {TIMEOUT_S:g} s to compile") from None

    def advance_and_fill(self, tokens: Callable[[], list[tuple[object, int]]], reqs: list[Req]) -> Future:
        """In the worker thread: each (matcher, token) of tokens() consumes its token, then the future's result
        is masks(reqs). A token a grammar forbids leaves its matcher in an error state (all ones from then on)."""
        def job() -> torch.Tensor:
            if pairs := tokens():
                self.ex.consume_token_par(pairs)
            return self.masks(reqs)
        return self.stepper.submit(job)

    def masks(self, reqs: list[Req]) -> torch.Tensor:
        """[len(reqs), vocab / 32] int32 bitmasks of their next tokens (all ones for a finished one)."""
        mask = torch.full((len(reqs), (self.vocab + 31) // 32), -1, dtype=torch.int32)
        live = [(r.matcher, i) for i, r in enumerate(reqs) if r.finish_reason is None and not r.matcher.is_error()]
        if live:  # llguidance refuses an empty batch (llguidance.torch's wrapper imports torch._dynamo: seconds)
            self.ex.unsafe_compute_mask_ptr(live, mask.data_ptr(), mask.shape[1] * 4, len(reqs))
        return mask
