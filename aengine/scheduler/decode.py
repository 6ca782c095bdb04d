"""Decode steps: a page for each running request whose next token starts one; preemption when the pool runs dry."""

from aengine.scheduler.kv import Planner
from aengine.scheduler.request import Req


class DecodePlanner(Planner):
    def _full(self, reqs: list[Req]) -> list[Req]:
        """Those of reqs whose next token starts a page (inline: it runs over every row, every step)."""
        ps = self.kv.ps
        return [r for r in reqs if r.kv_len // ps >= len(r.pages)]

    def with_pages(self, reqs: list[Req], full: list[Req] | None = None) -> list[Req]:
        """Give every request whose next token starts a page that page, if all of them fit (else
        none: plan(), which can preempt, takes over). Returns the requests ready to decode."""
        full = self._full(reqs) if full is None else full
        if len(full) > self.kv.available():
            return []
        for r, page in zip(full, self.kv.take(len(full))):  # one allocator call for the whole step
            r.pages.append(page)
        return reqs

    def plan(self, reqs: list[Req], can_retract: bool) -> list[Req]:
        """The requests of the next decode step, preempting the newest if pages run short. Empty
        when it must wait: preemption only happens with no step in flight."""
        full = self._full(reqs)
        if len(full) > self.kv.available():
            if not can_retract:
                return []  # drain the in-flight batch first, then preempt
            reqs = list(reqs)
            while len(full) > self.kv.available() and len(self.running) > 1:
                if (victim := self.running[-1]) in reqs:
                    reqs.remove(victim)
                    full = [r for r in full if r is not victim]
                self.retract(victim)
        return self.with_pages(reqs, full)

    def retract(self, victim: Req) -> None:
        """Preempt: its KV goes back (its computed prefix stays in the tree) and it waits first in line."""
        self.kv.release(victim)
        self.free_slots.append(victim.slot)
        victim.slot, victim.fill_ids, victim.kv_len = 0, victim.all_ids, 0
        self.running.remove(victim)
        self.waiting.appendleft(victim)
        self.stats.preemptions += 1
