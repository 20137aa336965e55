"""Host-side allocator for the paged KV cache: hands out page indices and counts references.

Page 0 is the null page: padding rows of page tables point at it, so it is never handed out.
Pages are reference-counted so sequences can share a prefix or fork a sample; a shared page
is copied before it is written (`copy_on_write`). Freed pages are reused most recent first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence


class OutOfPagesError(RuntimeError):
    """Raised when an allocation asks for more pages than are free."""


class PageAllocator:
    """Reference-counted pool of `num_pages` KV-cache pages, page 0 included."""

    NULL_PAGE: int = 0

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"num_pages must be at least 2 (the null page plus one), got {num_pages}")
        self.num_pages = num_pages
        self._refcounts = [0] * num_pages
        # A stack: the next page handed out is the last one, so page 1 goes first.
        self._free = list(range(num_pages - 1, self.NULL_PAGE, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - 1 - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Return `n` fresh pages with refcount 1; all or nothing."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages, got {n}")
        if n > len(self._free):
            raise OutOfPagesError(f"asked for {n} pages but only {len(self._free)} are free")
        pages = [self._free.pop() for _ in range(n)]
        for page in pages:
            self._refcounts[page] = 1
        return pages

    def share(self, pages: Iterable[int]) -> None:
        """Add one reference to each page; all pages are checked before any changes."""
        pages = list(pages)
        for page in pages:
            self._check_allocated(page)
        for page in pages:
            self._refcounts[page] += 1

    def free(self, pages: Iterable[int]) -> None:
        """Drop one reference to each page; all pages are checked before any changes."""
        drops = Counter(pages)
        for page, count in drops.items():
            self._check_allocated(page)
            if count > self._refcounts[page]:
                raise ValueError(
                    f"page {page} freed {count} times but has only {self._refcounts[page]} references"
                )
        for page, count in drops.items():
            self._refcounts[page] -= count
            if self._refcounts[page] == 0:
                self._free.append(page)

    def refcount(self, page: int) -> int:
        self._check_in_range(page)
        return self._refcounts[page]

    def fork(self, pages: Sequence[int]) -> list[int]:
        """Share a parent's pages with a child sequence and return the child's page list."""
        self.share(pages)
        return list(pages)

    def copy_on_write(self, page: int) -> int:
        """Return a page the caller may write: `page` if unshared, else a fresh page replacing it.

        When a fresh page is returned the caller must copy the contents of `page` into it.
        """
        self._check_allocated(page)
        if self._refcounts[page] == 1:
            return page
        (new_page,) = self.allocate(1)
        self._refcounts[page] -= 1
        return new_page

    def _check_in_range(self, page: int) -> None:
        if not 0 <= page < self.num_pages:
            raise ValueError(f"page {page} is out of range for a pool of {self.num_pages} pages")

    def _check_allocated(self, page: int) -> None:
        self._check_in_range(page)
        if page == self.NULL_PAGE:
            raise ValueError(f"page {page} is the null page and is never allocated")
        if self._refcounts[page] == 0:
            raise ValueError(f"page {page} is not allocated")
