"""Which KV pages each request holds: the page allocator, the radix prefix cache, and the request side of both (a
request's pages begin with those of its locked radix path); Planner: the base of prefill.py's and decode.py's."""

from collections import deque

from aengine.cache.allocator import PageAllocator
from aengine.cache.radix import RadixCache
from aengine.scheduler.request import Req
from aengine.types import EngineStats


class KVManager:
    def __init__(self, num_pages: int, page_size: int, cache: str) -> None:
        self.ps = page_size
        self.alloc = PageAllocator(num_pages)
        self.tree = RadixCache(self.alloc, page_size) if cache == "radix" else None

    def available(self) -> int:
        """Pages a request could get now: free ones plus those only the prefix cache holds."""
        return self.alloc.num_free + (self.tree.evictable_pages if self.tree else 0)

    def take(self, n: int) -> list[int] | None:
        if n > self.alloc.num_free and self.tree is not None:
            self.tree.evict(n - self.alloc.num_free)
        return self.alloc.alloc(n)

    def cached_len(self, req: Req) -> int:
        """Tokens of req's prompt the prefix cache holds (no side effect: req may not be admitted)."""
        return self.tree.match_len(req.fill_ids[:-1]) if self.tree is not None else 0

    def attach_prefix(self, req: Req) -> None:
        """Give an admitted request its cached prefix, locked while it runs."""
        if self.tree is not None:
            # keep at least one token to compute: its logits give the first output
            req.pages, req.node = self.tree.match(req.fill_ids[:-1])  # pages: a new list, req's own
            self.tree.lock(req.node)
        req.kv_len = req.tree_len = len(req.pages) * self.ps
        req.synced_pages = 0

    def grow(self, req: Req, n: int, reserve: int = 0) -> int:
        """Pages for n more tokens of req (fewer if memory is short), leaving `reserve`; returns the tokens granted."""
        have = len(req.pages) * self.ps - req.kv_len
        while n > 0:
            need = -(-(n - have) // self.ps) if n > have else 0
            if need == 0 or need + reserve <= self.available():
                if (pages := self.take(need)) is not None:
                    req.pages.extend(pages)
                    return n
            n = min(n - 1, (have + max(0, self.available() - reserve) * self.ps))
        return 0

    def release(self, req: Req, cache: bool = True) -> None:
        """Free req's pages; the radix cache keeps their computed prefix (cache=False: only what it held already)."""
        start = 0
        if self.tree is not None:
            if cache:  # the KV written: all but the last sampled token
                tree_pages, _ = self.tree.insert(req.all_ids[: req.kv_len], req.pages)
                self.alloc.free([m for m, t in zip(req.pages, tree_pages) if m != t])  # duplicates
                start = len(tree_pages)
            else:  # req.pages begins with the pages of its locked node's path, which the tree owns
                node = req.node
                while node is not None:
                    start, node = start + len(node.pages), node.parent
            self.tree.unlock(req.node)
            req.node = None
        self.alloc.free(req.pages[start:])
        req.pages = []

    def cache_unfinished(self, req: Req) -> None:
        """Insert a running prompt's computed pages so others can share them while it runs on."""
        if self.tree is None:
            return
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

    def clear_cache(self) -> None:
        if self.tree is not None:  # every unreferenced node (all of them when nothing runs)
            self.tree.evict(self.tree.evictable_pages)

    def usage(self) -> tuple[int, int, int, int]:
        """(capacity, free, cached: held only by the prefix cache, evicted so far) in pages."""
        cached, evicted = (self.tree.evictable_pages, self.tree.evicted_pages) if self.tree else (0, 0)
        return self.alloc.capacity, self.alloc.num_free, cached, evicted

    def check(self, running: list[Req], idle: bool) -> list[str]:
        """Every page is free, held by a running request, or held by the radix tree, exactly once."""
        pages, problems = self.tree.check() if self.tree is not None else ([], [])
        owned = set(pages).union(*(r.pages for r in running))
        free = self.alloc.free_pages()
        if len(pages) != len(set(pages)) or owned & set(free) or len(set(free)) != len(free):
            problems.append("a page is held twice, or held and free")
        if idle and (lost := self.alloc.capacity - len(owned) - len(free)):
            problems.append(f"idle, but {lost} pages are neither free nor cached")
        return problems


class Planner:
    """A step planner: works on the scheduler's own queues (the same list and deque objects) and KV."""

    def __init__(self, kv: KVManager, waiting: deque[Req], running: list[Req], free_slots: list[int],
                 stats: EngineStats) -> None:
        self.kv, self.waiting, self.running, self.free_slots, self.stats = kv, waiting, running, free_slots, stats
