"""Hands out KV pages. Page 0 is never handed out: padded rows of a CUDA graph write there."""


class PageAllocator:
    def __init__(self, num_pages: int) -> None:
        self.capacity = num_pages - 1
        self._free = list(range(num_pages - 1, 0, -1))
        self._is_free = bytearray([0]) + bytearray([1]) * (num_pages - 1)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def free_pages(self) -> list[int]:
        return list(self._free)

    def alloc(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        pages = self._free[len(self._free) - n :]
        del self._free[len(self._free) - n :]
        for p in pages:
            self._is_free[p] = 0
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if self._is_free[p]:
                raise AssertionError(f"page {p} freed twice")
            self._is_free[p] = 1
        self._free.extend(pages)
