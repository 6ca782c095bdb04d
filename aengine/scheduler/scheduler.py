"""The scheduler coroutine: continuous batching with a radix prefix cache, chunked prefill, preemption, and overlap
(batch N+1 is launched before batch N's results are awaited). A burst of waiting prompts is prefilled back to back;
arrivals one by one and a long prompt's chunks alternate with decode steps (why, and --enable-mixed-chunk:
docs/architecture.md, "Chunked prefill"). Concerns live beside this file: kv.py (who holds which pages), prefill.py
(admission, chunks), decode.py (decode pages, preemption), batch.py (the StepInput), results.py (tokens to values)."""

import asyncio
import dataclasses
import itertools
import logging
import time
from collections import deque
from concurrent.futures import Future

from aengine.config import EngineConfig
from aengine.runtime.executor import Executor, Pending, StepFault
from aengine.runtime.step import StepInput
from aengine.scheduler.batch import build_step
from aengine.scheduler.decode import DecodePlanner
from aengine.scheduler.grammar import Grammars
from aengine.scheduler.kv import KVManager
from aengine.scheduler.prefill import PrefillPlanner
from aengine.scheduler.request import Req
from aengine.scheduler.results import append_token, emit, take_logprobs
from aengine.types import EngineStats

log = logging.getLogger("aengine")

# A step that raises fails only its own requests. These many faulted steps in a row (no good step
# between them) mean the fault is not about one request: the engine state is then not trusted.
MAX_CONSECUTIVE_FAULTS = 3
POLL_S = 20e-6  # the grammar worker's wait for a step's ids: about the loop's own wake-up latency


class Scheduler:
    def __init__(self, cfg: EngineConfig, executor: Executor, eos_ids: set[int], grammars: Grammars) -> None:
        self.cfg, self.grammars, self.ex, self.eos_ids = cfg, grammars, executor, eos_ids
        self.max_model_len = executor.runner.max_model_len
        self.kv = KVManager(executor.runner.num_pages, executor.runner.page_size, cfg.cache)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []  # admitted: prefilling or decoding, in admission order
        self.free_slots = list(range(cfg.max_running_requests, 0, -1))
        self.aborted: list[Req] = []
        self.by_id: dict[str, Req] = {}
        self.counters = EngineStats()
        self.prefill = PrefillPlanner(self.kv, self.waiting, self.running, self.free_slots, self.counters)
        self.decode = DecodePlanner(self.kv, self.waiting, self.running, self.free_slots, self.counters)
        self.last_was_prefill = False
        self._wake, self._stopping = asyncio.Event(), False
        self.fault: BaseException | None = None
        self.faults = 0  # consecutive faulted steps

    def add(self, req: Req) -> None:
        self.by_id[req.rid] = req
        req.fill_ids = list(req.prompt_ids)
        self.waiting.append(req)
        self._wake.set()

    def abort(self, rid: str) -> None:
        if (req := self.by_id.get(rid)) is not None:  # with n > 1: all its copies
            self.aborted += [r for r in req.group or [req] if r.finish_reason is None]
            self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    def stats(self) -> EngineStats:
        capacity, free, cached, evicted = self.kv.usage()
        # pages only the radix cache holds are reclaimable: cached, not used
        return dataclasses.replace(self.counters, running=len(self.running), waiting=len(self.waiting),
                                   requests=len(self.by_id), pages_total=capacity, pages_free=free,
                                   pages_used=capacity - free - cached, pages_cached=cached, pages_evicted=evicted)

    def check(self) -> list[str]:
        problems = self.kv.check(self.running, idle=not self.by_id)
        if not self.by_id and sorted(self.free_slots) != list(range(1, self.cfg.max_running_requests + 1)):
            problems.append(f"idle, but {self.cfg.max_running_requests - len(self.free_slots)} slots are taken")
        return problems

    def clear_cache(self) -> None:
        self.kv.clear_cache()

    async def run(self) -> None:
        inflight: tuple[StepInput, list[Req], Pending] | None = None
        ahead: tuple[StepInput, list[Req]] | None = None  # the next step, built while masks were filled
        overlap = not self.cfg.disable_overlap
        try:
            while True:
                self._handle_aborts()
                if self._stopping and not self.by_id and inflight is None:
                    return
                batch, ahead = ahead or self._schedule(can_retract=inflight is None), None
                launched, masked, fill = None, [], None
                if batch is not None:
                    inp, reqs = batch
                    masked = [reqs[inp.sample_rows[i]] for i in inp.masked]
                if masked or (inflight is not None and inflight[0].masked):
                    fill = self._advance(inflight, masked)  # starts now: its wait for inflight's ids too
                if batch is not None:
                    try:
                        launched = (inp, reqs, self.ex.launch(inp, bool(masked)))
                    except Exception as e:  # CUDA: the forward is launched on this thread
                        self._step_failed(reqs, e)
                if processed := inflight is not None:
                    await self._process(*inflight)
                    # A result that was ready returns without yielding; yield anyway, so that the
                    # sessions' flush callbacks send this step's deltas now, not with the next ones
                    await asyncio.sleep(0)
                if fill is not None:  # the matchers advance before anything else reads them
                    if launched is not None and masked and overlap and not fill.done():
                        # build the next step meanwhile: after the masks only its launch is left
                        ahead = self._schedule(can_retract=False)
                    masks = fill.result()
                    if launched is not None and masked:
                        self.ex.sample(launched[2], inp, (inp.masked, masks))
                inflight = launched
                if inflight is not None and not overlap:
                    await self._process(*inflight)
                    if inflight[0].masked:
                        self._advance(inflight, []).result()
                    inflight = None
                if batch is None and not processed:
                    self._wake.clear()  # nothing ran and nothing finished: sleep until a request arrives or is aborted
                    await self._wake.wait()
                elif batch is None:
                    await asyncio.sleep(0)
        except BaseException as e:  # the engine state can no longer be trusted
            self.fault = e
            for req in [r for q in self.by_id.values() for r in q.group or [q] if r.finish_reason is None]:
                req.finish_reason = "error"
                emit(req, [], "", "error")
            self.by_id.clear()
            raise

    def _schedule(self, can_retract: bool) -> tuple[StepInput, list[Req]] | None:
        decodable = [r for r in self.running if r.kv_len >= len(r.fill_ids) and r.finish_reason is None
                     and len(r.output_ids) + r.pending < r.max_tokens]  # (not r.prefilling, inline: every row)
        want_prefill, budget = self.waiting or any(r.prefilling for r in self.running), self.cfg.max_prefill_tokens
        # a burst (a full step of prompt tokens waiting; summed no further) prefills back to back, so running requests
        # wait once; a trickle alternates with decodes (one prefill step of at most this budget per token), as chunks do
        burst = any(n >= budget for n in itertools.accumulate(len(r.fill_ids) for r in self.waiting))
        if decodable and self.cfg.max_prefill_tokens_decoding and not burst:
            budget = min(budget, self.cfg.max_prefill_tokens_decoding)
        if want_prefill and decodable and self.cfg.enable_mixed_chunk and len(decodable) < budget:
            ready = self.decode.with_pages(decodable)
            if ready and (chosen := self.prefill.plan(ready, budget)) is not None:
                self.last_was_prefill = False  # the running requests advanced too
                return self._build(chosen, decode=False, n_decoding=len(ready))
        if want_prefill and (not self.last_was_prefill or not decodable or burst and self.prefill.can_admit()):
            if (chosen := self.prefill.plan([], budget)) is not None:
                self.last_was_prefill = True
                return self._build(chosen, decode=False)
        self.last_was_prefill = False
        if decodable:
            reqs = self.decode.plan(decodable, can_retract)
            return self._build([(r, 1) for r in reqs], decode=True) if reqs else None
        if want_prefill and can_retract and len(self.running) > 1:
            # prompts hold pages but none can grow and nothing decodes: let the oldest finish
            self.decode.retract(self.running[-1])
            return self._schedule(can_retract)
        return None

    def _build(self, chosen: list[tuple[Req, int]], decode: bool, n_decoding: int = 0) -> tuple[StepInput, list[Req]]:
        return build_step(chosen, decode, n_decoding, self.counters, self.eos_ids), [r for r, _ in chosen]

    def _advance(self, step: tuple[StepInput, list[Req], Pending] | None, then: list[Req]) -> Future:
        """The grammar worker's job: once step's ids are in (it polls; a failed step has none), its constrained
        rows' matchers consume them; its result: the masks of the rows `then`. Started before the next launch."""
        def tokens() -> list[tuple[object, int]]:
            if step is None or not step[0].masked:
                return []
            inp, reqs, pending = step
            while (ids := self.ex.ready_ids(pending)) is None and self.fault is None:
                time.sleep(POLL_S)
            tok = (lambda x: int(x[0])) if inp.logprobs >= 0 else int  # a logprobs row: [id, logprob, ...]
            return [(r.matcher, tok(ids[i])) for i in inp.masked
                    if (r := reqs[inp.sample_rows[i]]).finish_reason is None] if ids else []
        return self.grammars.advance_and_fill(tokens, then)

    async def _process(self, inp: StepInput, reqs: list[Req], pending: Pending) -> None:
        try:
            ids = await self.ex.result(pending)
        except Exception as e:
            self._step_failed(reqs, e)
            return
        if any(r.finish_reason is None for r in reqs):  # not just the overlap step of a failed one
            self.faults = 0
        for row, tok in zip(inp.sample_rows, ids):
            req = reqs[row]
            req.pending -= 1
            if req.finish_reason is not None:
                continue  # finished while this step was in flight: its token is discarded
            self.counters.generated_tokens += 1
            if inp.logprobs >= 0:
                tok = take_logprobs(req, tok, inp.logprobs)
            reason = append_token(req, tok, self.eos_ids, self.max_model_len)
            text = req.detok.delta(final=reason is not None)
            if reason is not None:
                self._finish(req, reason, [tok], text)
            else:
                emit(req, [tok], text)
        if not inp.decode:  # cache computed prompts now, not when they finish, so that requests sharing them hit
            for req in reqs:
                if req.finish_reason is None and req.slot:
                    self.kv.cache_unfinished(req)
                    if req.group and not req.prefilling:
                        self._fork(req)

    def _fork(self, req: Req) -> None:
        """Queue, first in line, the copies of req (n > 1) still waiting for its prompt's KV."""
        for r in req.group:
            if not r.fill_ids and r.finish_reason is None:
                r.fill_ids = list(r.prompt_ids)
                self.waiting.appendleft(r)

    def _finish(self, req: Req, reason: str, ids: list[int], text: str, cache: bool = True) -> None:
        req.finish_reason = reason
        if req.slot:
            self.kv.release(req, cache)
            self.free_slots.append(req.slot)
            req.slot = 0
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if all(r.finish_reason for r in req.group):
            self.by_id.pop(req.rid, None)
        self._fork(req)  # its prompt is cached now (unless it failed: then the copies compute it)
        self.counters.finished += 1
        emit(req, ids, text, reason)

    def _step_failed(self, reqs: list[Req], e: Exception) -> None:
        """Fail the step's requests with "error" and free their KV, keeping none of it in the prefix
        cache (the failed step may have written garbage); re-raise when the state is not trusted."""
        self.faults += 1
        if self.faults >= MAX_CONSECUTIVE_FAULTS or isinstance(e, StepFault):
            raise e
        log.error("a step failed; failing its %d request(s)", len(set(reqs)), exc_info=e)
        for req in dict.fromkeys(reqs):
            if req.finish_reason is None:
                self._finish(req, "error", [], "", cache=False)

    def _handle_aborts(self) -> None:
        for req in self.aborted:
            if req.finish_reason is None:
                self._finish(req, "cancelled", [], req.detok.delta(final=True))
        self.aborted.clear()
