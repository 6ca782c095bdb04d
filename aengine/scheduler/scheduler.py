"""The scheduler coroutine: continuous batching with a radix prefix cache, chunked prefill,
preemption, and overlap (batch N+1 is launched before batch N's results are awaited).

Steps alternate: a prefill step (chunks of waiting prompts, up to max_prefill_tokens) and a
decode step (one token for every running request). Alternating rather than mixing keeps decode
steps pure, so they replay as CUDA graphs and use the decode kernels, and still lets running
requests advance between the chunks of a long prompt. With `mixed` (--enable-mixed-chunk) the
running requests' tokens ride along in each prefill step instead, within its token budget: no
decode waits a whole prefill step, at the price of those steps running without CUDA graphs."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass

from aengine.cache.allocator import PageAllocator
from aengine.cache.radix import RadixCache
from aengine.engine.executor import Executor, Pending
from aengine.engine.step import StepInput
from aengine.scheduler.request import PREFIX_KEY, Req

log = logging.getLogger("aengine")

# A step that raises fails only its own requests. These many faulted steps in a row (no good step
# between them) mean the fault is not about one request: the engine state is then not trusted.
MAX_CONSECUTIVE_FAULTS = 3


def _untrusted(e: BaseException) -> bool:
    """Faults after which the device or a rank is in an unknown state (CUDA errors, a dead TP rank)."""
    return not isinstance(e, Exception) or "CUDA" in str(e) or type(e).__name__ == "RankDied"


@dataclass
class Stats:
    prefill_tokens: int = 0  # prompt tokens computed
    cache_hit_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    finished: int = 0
    mixed_steps: int = 0  # prefill steps that also decoded running requests


class Scheduler:
    def __init__(self, executor: Executor, eos_ids: set[int], *, page_size: int, num_pages: int,
                 max_running: int, max_prefill_tokens: int, max_model_len: int, cache: str,
                 overlap: bool, mixed: bool = False) -> None:
        self.ex = executor
        self.eos_ids = eos_ids
        self.ps = page_size
        self.alloc = PageAllocator(num_pages)
        self.tree = RadixCache(self.alloc, page_size) if cache == "radix" else None
        self.max_running = max_running
        self.max_prefill = max_prefill_tokens
        self.max_model_len = max_model_len
        self.overlap = overlap
        self.mixed = mixed
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []  # admitted: prefilling or decoding, in admission order
        self.free_slots = list(range(max_running, 0, -1))
        self.aborted: list[Req] = []
        self.by_id: dict[str, Req] = {}
        self.stats = Stats()
        self.last_was_prefill = False
        self._wake = asyncio.Event()
        self._stopping = False
        self.fault: BaseException | None = None
        self.faults = 0  # consecutive faulted steps

    # ---- front-end interface -------------------------------------------------------------
    def add(self, req: Req) -> None:
        self.by_id[req.rid] = req
        req.fill_ids = list(req.prompt_ids)
        self.waiting.append(req)
        self._wake.set()

    def abort(self, rid: str) -> None:
        req = self.by_id.get(rid)
        if req is not None and req.finish_reason is None:
            self.aborted.append(req)
            self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    @property
    def num_requests(self) -> int:
        return len(self.by_id)

    def available_pages(self) -> int:
        return self.alloc.num_free + (self.tree.evictable_pages if self.tree else 0)

    # ---- the loop ------------------------------------------------------------------------
    async def run(self) -> None:
        inflight: tuple[StepInput, list[Req], Pending] | None = None
        try:
            while True:
                self._handle_aborts()
                if self._stopping and not self.by_id and inflight is None:
                    return
                batch = self._schedule(can_retract=inflight is None)
                launched = None
                if batch is not None:
                    inp, reqs = batch
                    try:
                        launched = (inp, reqs, self.ex.launch(inp))
                    except Exception as e:  # CUDA: the forward is launched on this thread
                        self._step_failed(reqs, e)
                processed = inflight is not None
                if inflight is not None:
                    await self._process(*inflight)
                inflight = launched
                if inflight is not None and not self.overlap:
                    await self._process(*inflight)
                    inflight = None
                if batch is None and not processed:
                    # nothing ran and nothing finished: sleep until a request arrives or is aborted
                    self._wake.clear()
                    await self._wake.wait()
                elif batch is None:
                    await asyncio.sleep(0)
        except BaseException as e:  # the engine state can no longer be trusted
            self.fault = e
            for req in list(self.by_id.values()):
                req.finish_reason = "error"
                req.emit(req, [], "", "error")
            self.by_id.clear()
            raise

    # ---- scheduling ----------------------------------------------------------------------
    def _schedule(self, can_retract: bool) -> tuple[StepInput, list[Req]] | None:
        decodable = [r for r in self.running if not r.prefilling and r.finish_reason is None
                     and len(r.output_ids) + r.pending < r.max_tokens]
        want_prefill = self.waiting or any(r.prefilling for r in self.running)
        if want_prefill and decodable and self.mixed and len(decodable) < self.max_prefill:
            ready = self._decode_pages(decodable)
            batch = self._schedule_prefill(ready) if ready else None
            if batch is not None:
                self.last_was_prefill = False  # the running requests advanced too
                return batch
        if want_prefill and (not self.last_was_prefill or not decodable):
            batch = self._schedule_prefill()
            if batch is not None:
                self.last_was_prefill = True
                return batch
        self.last_was_prefill = False
        if decodable:
            return self._schedule_decode(decodable, can_retract)
        if want_prefill and can_retract and len(self.running) > 1:
            # prompts hold pages but none can grow and nothing decodes: let the oldest finish
            self._retract_one(self.running[-1])
            return self._schedule(can_retract)
        return None

    def _alloc(self, n: int) -> list[int] | None:
        if n > self.alloc.num_free and self.tree is not None:
            self.tree.evict(n - self.alloc.num_free)
        return self.alloc.alloc(n)

    def _admit(self, req: Req) -> bool:
        """Give a waiting request a slot and its cached prefix."""
        if not self.free_slots or len(self.running) >= self.max_running:
            return False
        if self.tree is not None:
            # keep at least one token to compute: its logits give the first output
            pages, node = self.tree.match(req.fill_ids[:-1])
            self.tree.lock(node)
            req.node, req.pages = node, list(pages)
        req.kv_len = req.tree_len = len(req.pages) * self.ps
        if not req.output_ids:
            req.cached_tokens = req.kv_len
        self.stats.cache_hit_tokens += req.kv_len
        req.synced_pages = 0
        req.slot = self.free_slots.pop()
        self.running.append(req)
        return True

    def _decode_pages(self, reqs: list[Req]) -> list[Req]:
        """Give every request whose next token starts a page that page, if all of them fit (else
        none: the decode path, which can preempt, takes over). Returns the requests ready to decode."""
        full = [r for r in reqs if r.kv_len // self.ps >= len(r.pages)]
        if len(full) > self.available_pages():
            return []
        for r, page in zip(full, self._alloc(len(full))):  # one allocator call for the whole step
            r.pages.append(page)
        return reqs

    def _schedule_prefill(self, decoding: list[Req] | None = None) -> tuple[StepInput, list[Req]] | None:
        """Chunks of prompts up to the token budget; `decoding` requests (mixed steps) come first,
        one token each."""
        decoding = decoding or []
        budget = self.max_prefill - len(decoding)
        chosen: list[tuple[Req, int]] = [(r, 1) for r in decoding]
        reserve = sum(1 for r in self.running if not r.prefilling)  # next decode step's pages
        for req in [r for r in self.running if r.prefilling and r.finish_reason is None]:
            if budget <= 0:
                break
            n = self._grow(req, min(budget, len(req.fill_ids) - req.kv_len), reserve)
            if n:
                chosen.append((req, n))
                budget -= n
        # Prompts whose opening is being computed right now but is not in the tree yet: a waiting
        # request that starts the same way waits a step and then reuses that KV (many requests
        # arriving at once with one system prompt would otherwise all compute it).
        pending = {r.prefix_key for r in self.running if r.tree_len < PREFIX_KEY} if self.tree else set()
        i = 0
        while i < len(self.waiting) and budget > 0:
            req = self.waiting[i]
            if req.prefix_key is not None and req.prefix_key in pending:
                i += 1
                continue
            need = -(-(len(req.fill_ids) - self._cached_len(req)) // self.ps)
            if need + reserve > self.available_pages() and (self.running or chosen):
                break  # wait for memory rather than thrash
            if not self._admit(req):
                break
            del self.waiting[i]
            if req.tree_len < PREFIX_KEY:
                pending.add(req.prefix_key)
            n = self._grow(req, min(budget, len(req.fill_ids) - req.kv_len), reserve)
            if n == 0:
                break
            chosen.append((req, n))
            budget -= n
        if len(chosen) == len(decoding):
            return None
        return self._build(chosen, decode=False, n_decoding=len(decoding))

    def _cached_len(self, req: Req) -> int:
        if self.tree is None:
            return 0
        node, _, i = self.tree._walk(req.fill_ids[:-1])
        return i

    def _grow(self, req: Req, n: int, reserve: int = 0) -> int:
        """Extend req's pages to hold n more tokens (fewer if memory is short); returns tokens granted."""
        have = len(req.pages) * self.ps - req.kv_len
        while n > 0:
            need = -(-(n - have) // self.ps) if n > have else 0
            if need == 0 or need + reserve <= self.available_pages():
                pages = self._alloc(need)
                if pages is not None:
                    req.pages.extend(pages)
                    return n
            n = min(n - 1, (have + max(0, self.available_pages() - reserve) * self.ps))
        return 0

    def _schedule_decode(self, reqs: list[Req], can_retract: bool) -> tuple[StepInput, list[Req]] | None:
        full = [r for r in reqs if r.kv_len // self.ps >= len(r.pages)]  # their next token needs a page
        if len(full) > self.available_pages():
            if not can_retract:
                return None  # drain the in-flight batch first, then preempt
            reqs = self._retract(reqs, len(full))
        reqs = self._decode_pages(reqs)
        return self._build([(r, 1) for r in reqs], decode=True) if reqs else None

    def _retract(self, reqs: list[Req], need: int) -> list[Req]:
        """Preempt the newest requests until the rest fit; their KV goes back (prefix kept in the tree)."""
        reqs = list(reqs)
        while need > self.available_pages() and len(self.running) > 1:
            victim = self.running[-1]
            if victim in reqs:
                reqs.remove(victim)
                if victim.kv_len % self.ps == 0 and victim.kv_len // self.ps >= len(victim.pages):
                    need -= 1
            self._retract_one(victim)
        return reqs

    def _retract_one(self, victim: Req) -> None:
        self._release(victim)
        victim.fill_ids = victim.all_ids
        victim.kv_len = 0
        self.running.remove(victim)
        self.waiting.appendleft(victim)
        self.stats.preemptions += 1

    def _build(self, chosen: list[tuple[Req, int]], decode: bool,
               n_decoding: int = 0) -> tuple[StepInput, list[Req]]:
        """The step's StepInput; in a prefill step the first n_decoding rows decode (mixed step)."""
        inp = StepInput(decode, [], [], [], [], [], [], [], [], [], [], [], [], [])
        reqs = []
        inp.decoding = n_decoding
        self.stats.mixed_steps += n_decoding > 0
        for i, (req, n) in enumerate(chosen):
            if i < n_decoding:  # its token is the last one sampled, not known here under overlap
                inp.input_ids.append(0)
            elif not decode:
                inp.input_ids.extend(req.fill_ids[req.kv_len : req.kv_len + n])
                self.stats.prefill_tokens += n
            req.kv_len += n
            inp.slots.append(req.slot)
            inp.seq_lens.append(req.kv_len)
            inp.extend_lens.append(n)
            if req.synced_pages < len(req.pages):
                k = len(req.pages) - req.synced_pages
                inp.pt_rows.extend([req.slot] * k)
                inp.pt_cols.extend(range(req.synced_pages, len(req.pages)))
                inp.pt_pages.extend(req.pages[req.synced_pages :])
                req.synced_pages = len(req.pages)
            if not req.prefilling:  # this step's last token yields the next output
                p = req.params
                inp.sample_rows.append(i)
                inp.temperature.append(float(p.temperature))
                inp.top_p.append(float(p.top_p))
                inp.top_k.append(max(0, p.top_k))
                inp.min_p.append(float(p.min_p))
                inp.seeds.append(-1 if p.seed is None else p.seed)
                req.pending += 1
            reqs.append(req)
        return inp, reqs

    # ---- results -------------------------------------------------------------------------
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
            self._append(req, tok)
        if self.tree is not None and not inp.decode:
            # cache computed prompts now, not when they finish, so that requests sharing them hit
            for req in reqs:
                if req.finish_reason is None and req.slot:
                    self._cache_unfinished(req)

    def _append(self, req: Req, tok: int) -> None:
        t = time.monotonic()
        if not req.output_ids:
            req.t_first = t
        req.t_last = t
        req.output_ids.append(tok)
        self.stats.generated_tokens += 1
        p = req.params
        reason = None
        if (tok in self.eos_ids and not p.ignore_eos) or (p.stop_token_ids and tok in p.stop_token_ids):
            reason = "stop"
        elif req.detok.add(tok):
            reason = "stop"
        elif len(req.output_ids) >= req.max_tokens or len(req.prompt_ids) + len(req.output_ids) >= self.max_model_len:
            reason = "length"
        text = req.detok.delta(final=reason is not None)
        if reason is not None:
            self._finish(req, reason, [tok], text)
        else:
            req.emit(req, [tok], text, None)

    def _finish(self, req: Req, reason: str, ids: list[int], text: str, cache: bool = True) -> None:
        req.finish_reason = reason
        if req.slot:
            self._release(req, cache)
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.by_id.pop(req.rid, None)
        self.stats.finished += 1
        req.emit(req, ids, text, reason)

    def _step_failed(self, reqs: list[Req], e: Exception) -> None:
        """Fail the step's requests with "error" and free their KV, keeping none of it in the prefix
        cache (the failed step may have written garbage); re-raise when the state is not trusted."""
        self.faults += 1
        if self.faults >= MAX_CONSECUTIVE_FAULTS or _untrusted(e):
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

    # ---- KV ownership --------------------------------------------------------------------
    def _computed_len(self, req: Req) -> int:
        """Tokens whose KV is (or, by stream order, will be) written: all but the last sampled token."""
        return min(req.kv_len, len(req.all_ids))

    def _release(self, req: Req, cache: bool = True) -> None:
        """Give back req's slot and pages; with the radix cache its computed prefix stays cached
        (with cache=False only what the tree already held stays)."""
        n = self._computed_len(req)
        start = 0
        if self.tree is not None:
            if cache:
                tree_pages, _ = self.tree.insert(req.all_ids[:n], req.pages)
                dups = [m for m, t in zip(req.pages, tree_pages) if m != t]
                self.alloc.free(dups)
                start = len(tree_pages)
            else:  # req.pages begins with the pages of its locked node's path, which the tree owns
                node = req.node
                while node is not None:
                    start, node = start + len(node.pages), node.parent
            self.tree.unlock(req.node)
            req.node = None
        self.alloc.free(req.pages[start:])
        req.pages = []
        self.free_slots.append(req.slot)
        req.slot = 0

    def _cache_unfinished(self, req: Req) -> None:
        """Insert a chunked prompt's computed pages so others can share them while it runs on."""
        tree_pages, node = self.tree.insert(req.fill_ids[: req.kv_len], req.pages)
        req.tree_len = len(tree_pages) * self.ps
        for i, (m, t) in enumerate(zip(req.pages, tree_pages)):
            if m != t:
                self.alloc.free([m])
                req.pages[i] = t
                req.synced_pages = min(req.synced_pages, i)
        self.tree.lock(node)
        self.tree.unlock(req.node)
        req.node = node
