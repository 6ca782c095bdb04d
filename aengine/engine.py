"""AsyncEngine: the one object every front end (the offline LLM, the shell, the server) drives. It loads the
model, owns the scheduler coroutine, validates requests and tokenizes. Callers see only aengine.types values."""

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aengine.config import EngineConfig
from aengine.models import model_class
from aengine.runtime.executor import Executor
from aengine.runtime.runner import ModelRunner
from aengine.scheduler.grammar import Grammars
from aengine.scheduler.request import Req
from aengine.scheduler.scheduler import Scheduler
from aengine.tokenizer import Detokenizer, Tokenizer
from aengine.tp.launch import start_tp
from aengine.types import ContextLengthExceeded, EmitFn, EngineStats, InvalidRequest, RequestDelta, SamplingParams
from aengine.weights import load_hf_config, resolve_model

log = logging.getLogger("aengine")


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


class AsyncEngine:
    """`executor`: one to use instead of building the model from cfg (the overhead benchmark runs
    the real scheduler over a stub executor); it must have a runner with page_size, num_pages, max_model_len."""

    def __init__(self, cfg: EngineConfig | None = None, executor: Executor | None = None, **kw: object) -> None:
        cfg = (cfg or EngineConfig()).replace(**kw)
        self.cfg, t0 = cfg, time.perf_counter()
        self.path = resolve_model(cfg.model)
        self.hf_config = load_hf_config(self.path)
        model_class(self.hf_config)  # fail early on an unknown architecture
        tok_path = Path(cfg.tokenizer) if cfg.tokenizer else self.path
        if not any((tok_path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            log.warning("no tokenizer in %s; using the embedded model's tokenizer", tok_path)
            tok_path = resolve_model(None)
        self.model_name = cfg.model or "SmolLM2-135M-Instruct"
        # the tokenizer loads (mostly imports: seconds) in a thread while the model loads
        with ThreadPoolExecutor(1, thread_name_prefix="aengine-tok-load") as pool:
            tok = pool.submit(lambda t=time.perf_counter(): (Tokenizer(tok_path), time.perf_counter() - t))
            self.executor = executor if executor is not None else start_tp(cfg, self.hf_config, self.path) \
                if cfg.tp > 1 or cfg.nnodes > 1 else Executor(ModelRunner(cfg, self.hf_config, self.path))
            self.tokenizer, t_tok = tok.result()
        self.grammars = Grammars(self.tokenizer, self.hf_config.vocab_size, min(self.tokenizer.eos_ids))
        self.runner: ModelRunner = self.executor.runner
        self.max_model_len = self.runner.max_model_len
        log.info("engine ready in %.1f s (the tokenizer, loaded meanwhile, took %.1f s)",
                 time.perf_counter() - t0, t_tok)
        self.scheduler: Scheduler | None = None
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        if self.task is not None:
            return
        self.scheduler = Scheduler(self.cfg, self.executor, self.tokenizer.eos_ids, self.grammars)
        self.task = asyncio.create_task(self.scheduler.run(), name="aengine-scheduler")

    @property
    def healthy(self) -> bool:
        return self.task is not None and not self.task.done()

    async def shutdown(self) -> None:
        if self.task is None:
            return
        self.scheduler.stop()
        for rid in list(self.scheduler.by_id):
            self.scheduler.abort(rid)
        try:
            await self.task
        finally:
            self.task = None
            self.executor.shutdown()

    def encode(self, prompt: str | None = None, messages: list[dict] | None = None,
               input_ids: list[int] | None = None) -> list[int]:
        """Token ids of exactly one of prompt / messages / input_ids (slow for long inputs: call it off the loop)."""
        vocab = self.hf_config.vocab_size
        if sum(x is not None for x in (prompt, messages, input_ids)) != 1:
            raise InvalidRequest("give exactly one of prompt, messages, input_ids")
        if prompt is not None:
            if not isinstance(prompt, str):
                raise InvalidRequest("prompt must be a string")
            ids = self.tokenizer.encode(prompt)
        elif messages is not None:
            if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and isinstance(
                    m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
                raise InvalidRequest("messages must be a non-empty list of {role, content} strings")
            ids = self.tokenizer.apply_chat_template(messages)
        else:
            ids = input_ids
            if not isinstance(ids, list) or not set(map(type, ids)) <= {int}:  # in C: bool (and subclasses) out
                raise InvalidRequest("input_ids must be a list of integers")
            if ids and (min(ids) < 0 or max(ids) >= vocab):  # min/max run in C; the list only on error
                bad = [t for t in ids if not 0 <= t < vocab]
                raise InvalidRequest(f"input_ids out of range [0, {vocab}): {bad[:5]}")
        if not ids:
            raise InvalidRequest("the prompt is empty")
        if input_ids is None and max(ids) >= vocab:
            # a tokenizer borrowed for a smaller dummy model can produce ids the model lacks
            raise InvalidRequest(f"the tokenizer produced ids beyond this model's vocabulary ({vocab}); "
                                 "send input_ids instead")
        return list(ids)

    def check_size(self, prompt: str | None = None, messages: list[dict] | None = None,
                   input_ids: list[int] | None = None) -> None:
        """Refuse, untokenized, a prompt too long for the context whatever its tokens (each stands for at most
        tokenizer.max_token_bytes bytes). Cheap: run it on the loop, before the prompt waits for a tokenizer."""
        if input_ids is not None:
            n = len(input_ids) if isinstance(input_ids, list) else 0
        else:
            texts = [prompt] if prompt is not None else \
                [m.get("content") for m in messages or [] if isinstance(m, dict)]
            n = sum(len(t.encode()) for t in texts if isinstance(t, str)) // self.tokenizer.max_token_bytes
        if n >= self.max_model_len:
            raise ContextLengthExceeded(f"the prompt has at least {n} tokens; this engine's context is "
                                        f"{self.max_model_len} tokens")

    def submit(self, rid: str, prompt_ids: list[int], params: SamplingParams, emit: EmitFn) -> None:
        """Queue a request; `emit` gets each RequestDelta on the loop, the last one of each completion (`index`)
        with the finish reason and the RequestOutput; copy i > 0 of a seeded request draws with a derived seed.
        Await grammars.prepare(params) first (else a grammar compiles here, on the loop)."""
        if self.scheduler is None or self.task is None:
            raise RuntimeError("engine not started")
        if self.task.done():
            raise RuntimeError("the engine stopped after a fault")
        params.validate()
        n, limit = len(prompt_ids), self.max_model_len
        if n >= limit:
            raise ContextLengthExceeded(f"the prompt has {n} tokens; this engine's context is {limit} tokens "
                                        f"(including at least one generated token)")
        max_tokens = limit - n if params.max_tokens is None else params.max_tokens
        if n + max_tokens > limit:
            raise ContextLengthExceeded(
                f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds the context of {limit} tokens")
        for name in ("stop_token_ids", "logit_bias"):
            for t in getattr(params, name) or ():
                if not 0 <= t < self.hf_config.vocab_size:
                    raise InvalidRequest(f"{name} holds {t}, outside the vocabulary")
        if rid in self.scheduler.by_id:
            raise InvalidRequest(f"request id {rid!r} is already running")
        grammar = params.constraint and self.grammars.compile(params.constraint)
        group = []
        for i in range(params.n):
            p = params if i == 0 or params.seed is None else \
                dataclasses.replace(params, seed=hash((params.seed, i)) & (2**63 - 1))
            group.append(Req(rid, prompt_ids, p, Detokenizer(self.tokenizer, p.stop_list), emit, max_tokens, grammar,
                             index=i, logprobs=None if p.logprobs is None else []))
            group[i].group = group if params.n > 1 else []
        self.scheduler.add(group[0])

    async def generate(self, rid: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestDelta]:
        q: asyncio.Queue[RequestDelta] = asyncio.Queue()
        self.submit(rid, prompt_ids, params, q.put_nowait)
        left = params.n
        try:
            while left:
                yield (d := await q.get())
                left -= d.finish_reason is not None
        finally:
            self.abort(rid)

    def abort(self, rid: str) -> None:
        if self.scheduler is not None:
            self.scheduler.abort(rid)

    def stats(self) -> EngineStats:
        return self.scheduler.stats() if self.scheduler is not None else EngineStats()

    def check(self) -> list[str]:
        """Integrity problems of the KV pages and the prefix cache (an empty list when sound)."""
        return self.scheduler.check() if self.scheduler is not None else []

    def clear_cache(self) -> None:
        """Drop what the prefix cache holds that no running request uses."""
        if self.scheduler is not None:
            self.scheduler.clear_cache()
