"""The offline API: LLM.generate / LLM.chat, driving the server's scheduler coroutine on a private event loop."""

import asyncio
import contextlib
import itertools
from collections.abc import Sequence

from aengine.config import EngineConfig
from aengine.engine import AsyncEngine, new_event_loop
from aengine.types import EngineStats, RequestDelta, RequestOutput, SamplingParams


class LLM:
    def __init__(self, model: str | None = None, **kw: object) -> None:
        self.engine = AsyncEngine((kw.pop("config", None) or EngineConfig()).replace(model=model, **kw))
        self.tokenizer = self.engine.tokenizer
        self._loop = new_event_loop()
        self._loop.run_until_complete(self.engine.start())
        self._ids = itertools.count()

    def generate(self, prompts: Sequence[str] | Sequence[list[int]] | str,
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order; with n > 1, n per prompt, each prompt's together
        in `index` order (vLLM's RequestOutput.outputs, flattened). chat() returns the same."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [self.engine.encode(input_ids=list(p)) if isinstance(p, list) else self.engine.encode(prompt=p)
               for p in prompts]
        return self._loop.run_until_complete(self._run(ids, sampling, use_tqdm))

    def chat(self, conversations: Sequence[list[dict]] | list[dict],
             sampling: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        ids = [self.engine.encode(messages=list(c)) for c in conversations]
        return self._loop.run_until_complete(self._run(ids, sampling, use_tqdm))

    async def _run(self, prompt_ids: list[list[int]], sampling: object, use_tqdm: bool) -> list[RequestOutput]:
        params = list(sampling) if isinstance(sampling, (list, tuple)) else \
            [sampling or SamplingParams()] * len(prompt_ids)
        if len(params) != len(prompt_ids):
            raise ValueError("give one SamplingParams, or one per prompt")
        for p in params:
            p.validate()
        done = asyncio.Event()
        outs: dict[str, RequestOutput] = {}
        bar, total = None, sum(p.n for p in params)
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="completions")

        def emit(d: RequestDelta) -> None:
            if d.output is None:
                return
            outs[d.output.id, d.index] = d.output
            if bar is not None:
                bar.update(1)
            if len(outs) == total:
                done.set()

        rids = []
        try:
            # only constrained ones: gather wraps each in a task, a loop turn per call even for nothing to compile
            await asyncio.gather(*(self.engine.grammars.prepare(p) for p in params if p.constraint is not None))
            for ids, p in zip(prompt_ids, params):
                self.engine.submit(rid := f"llm-{next(self._ids)}", ids, p, emit)
                rids.append(rid)
            if rids:
                waiter = asyncio.ensure_future(done.wait())
                await asyncio.wait([waiter, self.engine.task], return_when=asyncio.FIRST_COMPLETED)
                # a fault ends every request with finish_reason "error" (setting `done`) and then the task
                if not waiter.done() or self.engine.task.done():
                    waiter.cancel()
                    exc = self.engine.task.exception() if self.engine.task.done() else None
                    raise RuntimeError("the engine stopped") from exc
        finally:
            for rid in rids:
                self.engine.abort(rid)
            if bar is not None:
                bar.close()
        return [outs[r, i] for r, p in zip(rids, params) for i in range(p.n)]

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def clear_cache(self) -> None:
        self.engine.clear_cache()

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self.engine.shutdown())
            self._loop.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # a forgotten close() should not leave a scheduler task behind
            self.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
