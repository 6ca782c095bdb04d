"""Property tests: the radix tree and allocator against a brute-force model of the cache."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from aengine.cache.allocator import PageAllocator
from aengine.cache.radix import RadixCache

tokens = st.lists(st.integers(0, 2), min_size=0, max_size=14)


def tree_map(tree: RadixCache) -> dict[tuple[int, ...], int]:
    """Every cached page-aligned prefix -> the page holding its last page of tokens."""
    out, stack = {}, [(tree.root, ())]
    while stack:
        node, prefix = stack.pop()
        for j, page in enumerate(node.pages):
            out[prefix + tuple(node.key[: (j + 1) * tree.ps])] = page
        full = prefix + tuple(node.key)
        stack.extend((c, full) for c in node.children.values())
    return out


def nodes(tree: RadixCache) -> list:
    out, stack = [], list(tree.root.children.values())
    while stack:
        out.append(stack.pop())
        stack.extend(out[-1].children.values())
    return out


class RadixMachine(RuleBasedStateMachine):
    @initialize(ps=st.sampled_from([1, 2, 4]), n=st.integers(4, 40))
    def setup(self, ps: int, n: int) -> None:
        self.ps = ps
        self.alloc = PageAllocator(n + 1)
        self.tree = RadixCache(self.alloc, ps)
        self.model: dict[tuple[int, ...], int] = {}
        self.locks: list[tuple[object, tuple[int, ...]]] = []

    def _aligned(self, t: list[int]) -> int:
        return len(t) - len(t) % self.ps

    @rule(t=tokens)
    def match(self, t: list[int]) -> None:
        shape = lambda: (sorted(tree_map(self.tree).items()), sorted(len(n.key) for n in nodes(self.tree)),  # noqa: E731
                         [n.last_access for n in nodes(self.tree)])
        before = shape()
        predicted = self.tree.match_len(t)
        assert shape() == before and not self.tree.check()[1], "match_len changed the tree (split or LRU time)"
        pages, node = self.tree.match(t)
        best = max(k for k in range(0, self._aligned(t) + 1, self.ps) if k == 0 or tuple(t[:k]) in self.model)
        assert predicted == best, "match_len is not the longest cached prefix"
        assert len(pages) * self.ps == best, "match is not the longest cached prefix"
        assert pages == [self.model[tuple(t[: (i + 1) * self.ps])] for i in range(len(pages))]

    @rule(t=tokens)
    def insert(self, t: list[int]) -> None:
        n = self._aligned(t) // self.ps
        if n > self.alloc.num_free:
            self.tree.evict(n - self.alloc.num_free)
            self.model = tree_map(self.tree)
        mine = self.alloc.alloc(n)
        if mine is None:
            return
        have, node = self.tree.insert(t, mine)
        assert len(have) == n
        for i, (m, h) in enumerate(zip(mine, have)):
            key = tuple(t[: (i + 1) * self.ps])
            if key in self.model:
                assert h == self.model[key] and m != h
                self.alloc.free([m])  # the caller's duplicate
            else:
                assert h == m
                self.model[key] = m

    @rule(t=tokens)
    def lock(self, t: list[int]) -> None:
        pages, node = self.tree.match(t)
        self.tree.lock(node)
        self.locks.append((node, tuple(t[: len(pages) * self.ps])))

    @precondition(lambda self: self.locks)
    @rule(i=st.integers(0, 100))
    def unlock(self, i: int) -> None:
        node, _ = self.locks.pop(i % len(self.locks))
        self.tree.unlock(node)

    @rule(n=st.integers(0, 20))
    def evict(self, n: int) -> None:
        before = dict(self.model)
        evictable = self.tree.evictable_pages
        freed = self.tree.evict(n)
        after = tree_map(self.tree)
        assert all(before[k] == v for k, v in after.items()), "eviction changed a cached page"
        removed = set(before) - set(after)
        assert freed == len(removed)
        assert freed >= min(n, evictable)
        for _, prefix in self.locks:  # locked prefixes survive
            for k in range(self.ps, len(prefix) + 1, self.ps):
                assert prefix[:k] in after
        self.model = after

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "tree"):
            return
        assert tree_map(self.tree) == self.model
        pages = list(self.model.values())
        assert len(pages) == len(set(pages)), "a page is owned twice"
        assert not set(pages) & set(self.alloc._free), "a cached page is also free"
        assert self.tree.evictable_pages + self.tree.locked_pages + self.alloc.num_free == self.alloc.capacity
        locked = set()
        for _, prefix in self.locks:
            locked |= {self.model[prefix[:k]] for k in range(self.ps, len(prefix) + 1, self.ps)}
        assert self.tree.locked_pages == len(locked)
        stack = [self.tree.root]
        while stack:
            node = stack.pop()
            assert node.ref >= 0
            stack.extend(node.children.values())


def test_radix_against_model():
    run_state_machine_as_test(RadixMachine, settings=settings(max_examples=300, stateful_step_count=40,
                                                              deadline=None))


def test_allocator_never_hands_a_page_twice():
    a = PageAllocator(9)
    got = a.alloc(8)
    assert sorted(got) == list(range(1, 9)) and a.alloc(1) is None and a.num_free == 0
    a.free(got[:3])
    again = a.alloc(3)
    assert sorted(again) == sorted(got[:3])
    try:
        a.free([again[0], again[0]])
    except AssertionError:
        pass
    else:
        raise AssertionError("double free not caught")
