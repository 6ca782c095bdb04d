"""Admission and chunked prefill: the prompts (and their tokens) of the next prefill step, within budget and pages."""

from aengine.scheduler.kv import Planner
from aengine.scheduler.request import PREFIX_KEY, Req


class PrefillPlanner(Planner):
    def plan(self, decoding: list[Req], budget: int) -> list[tuple[Req, int]] | None:
        """(request, tokens) rows of a prefill step of `budget` tokens: `decoding` requests first (a mixed
        step), one token each, then chunks of running prompts, then newly admitted ones; None: none fits."""
        budget -= len(decoding)
        chosen: list[tuple[Req, int]] = [(r, 1) for r in decoding]
        reserve = sum(1 for r in self.running if not r.prefilling)  # next decode step's pages
        for req in [r for r in self.running if r.prefilling and r.finish_reason is None]:
            if budget <= 0:
                break
            if n := self.kv.grow(req, min(budget, len(req.fill_ids) - req.kv_len), reserve):
                chosen.append((req, n))
                budget -= n
        # a prompt whose opening another is computing now waits a step, then reuses that KV (docs/architecture.md)
        pending = {r.prefix_key for r in self.running if r.tree_len < PREFIX_KEY} if self.kv.tree else set()
        i = 0
        while i < len(self.waiting) and budget > 0:
            req = self.waiting[i]
            if req.prefix_key is not None and req.prefix_key in pending:
                i += 1
                continue
            if not self._fits(req, reserve) and (self.running or chosen):
                break  # wait for a slot or for memory rather than thrash (alone, a prompt goes in anyway)
            # admit it: a slot (one is free, as checked above) and its cached prefix
            self.kv.attach_prefix(req)
            if not req.output_ids:
                req.cached_tokens = req.kv_len
            self.stats.cache_hit_tokens += req.kv_len
            req.slot = self.free_slots.pop()
            self.running.append(req)
            del self.waiting[i]
            if req.tree_len < PREFIX_KEY:
                pending.add(req.prefix_key)
            if (n := self.kv.grow(req, min(budget, len(req.fill_ids) - req.kv_len), reserve)) == 0:
                break
            chosen.append((req, n))
            budget -= n
        return chosen if len(chosen) > len(decoding) else None

    def can_admit(self) -> bool:
        """Whether plan() would admit the first waiting prompt now (no side effect)."""
        return bool(self.waiting) and self._fits(self.waiting[0], sum(not r.prefilling for r in self.running))

    def _fits(self, req: Req, reserve: int) -> bool:
        """A slot is free and req's uncached pages fit beside `reserve`, the next decode step's pages."""
        need = -(-(len(req.fill_ids) - self.kv.cached_len(req)) // self.kv.ps)
        return bool(self.free_slots) and need + reserve <= self.kv.available()
