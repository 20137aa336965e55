"""Tests for the host-side KV-cache page allocator."""

import re

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from jinfer.engine.page_allocator import OutOfPagesError, PageAllocator


def assert_names(excinfo, *values):
    """Assert the raised exception's message mentions every value as a whole number."""
    message = str(excinfo.value)
    for value in values:
        assert re.search(rf"(?<![\d-]){re.escape(str(value))}(?!\d)", message), (value, message)


class PageAllocatorMachine(RuleBasedStateMachine):
    """Drives a PageAllocator at random and checks it against a dict of expected refcounts.

    `sequences` are page lists that each hold one reference per entry, as a sequence's page
    table does; `expected` maps every page in use to its reference count.
    """

    def __init__(self):
        super().__init__()
        self.alloc = None
        self.expected = {}
        self.sequences = []

    @initialize(num_pages=st.integers(2, 12))
    def create(self, num_pages):
        self.alloc = PageAllocator(num_pages)

    @property
    def model_free(self):
        return self.alloc.num_pages - 1 - len(self.expected)

    def snapshot(self):
        return self.alloc.num_free, [self.alloc.refcount(p) for p in range(self.alloc.num_pages)]

    def unused_pages(self):
        return [p for p in range(self.alloc.num_pages) if p not in self.expected]

    def draw_sequence(self, data):
        return data.draw(st.integers(0, len(self.sequences) - 1), label="sequence")

    def check_fresh(self, pages):
        assert len(set(pages)) == len(pages), f"page handed out twice in one call: {pages}"
        for page in pages:
            assert page != PageAllocator.NULL_PAGE
            assert page not in self.expected, f"page {page} handed out while in use"

    def release(self, pages):
        for page in pages:
            self.expected[page] -= 1
            if self.expected[page] == 0:
                del self.expected[page]

    @rule(n=st.integers(0, 13))
    def allocate(self, n):
        assert self.alloc.can_allocate(n) == (n <= self.model_free)
        if n > self.model_free:
            before = self.snapshot()
            with pytest.raises(OutOfPagesError):
                self.alloc.allocate(n)
            assert self.snapshot() == before
            return
        pages = self.alloc.allocate(n)
        assert len(pages) == n
        self.check_fresh(pages)
        self.expected.update(dict.fromkeys(pages, 1))
        self.sequences.append(pages)

    @rule(extra=st.integers(1, 3))
    def over_allocate(self, extra):
        before = self.snapshot()
        n = self.model_free + extra
        with pytest.raises(OutOfPagesError) as excinfo:
            self.alloc.allocate(n)
        assert_names(excinfo, n, self.model_free)
        assert self.snapshot() == before

    @precondition(lambda self: self.sequences)
    @rule(data=st.data())
    def share(self, data):
        pages = self.sequences[self.draw_sequence(data)]
        self.alloc.share(iter(pages))
        for page in pages:
            self.expected[page] += 1
        self.sequences.append(list(pages))

    @precondition(lambda self: self.sequences)
    @rule(data=st.data())
    def fork(self, data):
        parent = self.sequences[self.draw_sequence(data)]
        child = self.alloc.fork(parent)
        assert child == parent and child is not parent
        for page in child:
            self.expected[page] += 1
        self.sequences.append(child)

    @precondition(lambda self: any(self.sequences))
    @rule(data=st.data())
    def copy_on_write(self, data):
        seq = data.draw(st.sampled_from([s for s in self.sequences if s]), label="sequence")
        index = data.draw(st.integers(0, len(seq) - 1), label="index")
        page = seq[index]
        if self.expected[page] == 1:
            assert self.alloc.copy_on_write(page) == page
        elif self.model_free == 0:
            before = self.snapshot()
            with pytest.raises(OutOfPagesError):
                self.alloc.copy_on_write(page)
            assert self.snapshot() == before
        else:
            new_page = self.alloc.copy_on_write(page)
            self.check_fresh([new_page])
            self.expected[page] -= 1
            self.expected[new_page] = 1
            seq[index] = new_page

    @precondition(lambda self: self.sequences)
    @rule(data=st.data())
    def free_sequence(self, data):
        pages = self.sequences.pop(self.draw_sequence(data))
        self.alloc.free(iter(pages))
        self.release(pages)

    @rule(data=st.data())
    def free_unallocated(self, data):
        """A double free, or a free of the null page or a never-used page, raises and changes nothing."""
        bad = data.draw(st.sampled_from(self.unused_pages()), label="bad page")
        good = data.draw(st.sampled_from(self.sequences), label="valid pages") if self.sequences else []
        before = self.snapshot()
        with pytest.raises(ValueError) as excinfo:
            self.alloc.free([*good, bad])
        assert_names(excinfo, bad)
        assert self.snapshot() == before

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def free_too_often(self, data):
        """Freeing a page more times in one call than it has references raises and changes nothing."""
        page = data.draw(st.sampled_from(sorted(self.expected)), label="page")
        before = self.snapshot()
        with pytest.raises(ValueError) as excinfo:
            self.alloc.free([page] * (self.expected[page] + 1))
        assert_names(excinfo, page)
        assert self.snapshot() == before

    @rule(data=st.data())
    def share_unallocated(self, data):
        bad = data.draw(st.sampled_from(self.unused_pages()), label="bad page")
        good = data.draw(st.sampled_from(self.sequences), label="valid pages") if self.sequences else []
        before = self.snapshot()
        with pytest.raises(ValueError) as excinfo:
            self.alloc.share([*good, bad])
        assert_names(excinfo, bad)
        assert self.snapshot() == before

    @rule()
    def free_everything(self):
        """Freeing every sequence returns the whole pool: no page leaks."""
        while self.sequences:
            pages = self.sequences.pop()
            self.alloc.free(pages)
            self.release(pages)
        assert self.expected == {}
        assert self.alloc.num_free == self.alloc.num_pages - 1
        everything = self.alloc.allocate(self.alloc.num_pages - 1)
        assert sorted(everything) == list(range(1, self.alloc.num_pages))
        self.alloc.free(everything)

    @invariant()
    def matches_model(self):
        if self.alloc is None:
            return
        for page in range(self.alloc.num_pages):
            count = self.alloc.refcount(page)
            assert count >= 0
            assert count == self.expected.get(page, 0), f"page {page}"
        assert self.alloc.num_used == len(self.expected)
        assert self.alloc.num_free + self.alloc.num_used == self.alloc.num_pages - 1

    def teardown(self):
        if self.alloc is not None:
            self.free_everything()


PageAllocatorMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestPageAllocatorMachine = PageAllocatorMachine.TestCase


@pytest.mark.parametrize("num_pages", [1, 0, -3])
def test_rejects_pool_without_a_usable_page(num_pages):
    with pytest.raises(ValueError) as excinfo:
        PageAllocator(num_pages)
    assert_names(excinfo, num_pages)


def test_out_of_pages_names_request_and_free_count():
    alloc = PageAllocator(4)
    alloc.allocate(1)
    with pytest.raises(OutOfPagesError) as excinfo:
        alloc.allocate(5)
    assert_names(excinfo, 5, 2)
    assert isinstance(excinfo.value, RuntimeError)
    assert alloc.num_free == 2


def test_negative_allocation_names_the_count():
    with pytest.raises(ValueError) as excinfo:
        PageAllocator(4).allocate(-1)
    assert_names(excinfo, -1)


def test_double_free_names_the_page():
    alloc = PageAllocator(4)
    first, second = alloc.allocate(2)
    alloc.free([second])
    with pytest.raises(ValueError) as excinfo:
        alloc.free([first, second])
    assert_names(excinfo, second)
    assert alloc.refcount(first) == 1


@pytest.mark.parametrize("call", ["share", "free", "copy_on_write"])
def test_null_page_is_rejected(call):
    alloc = PageAllocator(4)
    alloc.allocate(3)
    arg = PageAllocator.NULL_PAGE if call == "copy_on_write" else [PageAllocator.NULL_PAGE]
    with pytest.raises(ValueError, match="null") as excinfo:
        getattr(alloc, call)(arg)
    assert_names(excinfo, PageAllocator.NULL_PAGE)


@pytest.mark.parametrize("page", [4, 99, -1])
def test_out_of_range_page_is_rejected(page):
    alloc = PageAllocator(4)
    alloc.allocate(3)
    for call in (alloc.refcount, alloc.copy_on_write, lambda p: alloc.free([p]), lambda p: alloc.share([p])):
        with pytest.raises(ValueError) as excinfo:
            call(page)
        assert_names(excinfo, page)


def test_copy_on_write_out_of_pages_changes_nothing():
    alloc = PageAllocator(3)
    page, _ = alloc.allocate(2)
    alloc.share([page])
    with pytest.raises(OutOfPagesError) as excinfo:
        alloc.copy_on_write(page)
    assert_names(excinfo, 1, 0)
    assert alloc.refcount(page) == 2
    assert alloc.num_free == 0


def test_freed_pages_are_reused_most_recent_first():
    alloc = PageAllocator(8)
    pages = alloc.allocate(5)
    alloc.free([pages[1]])
    alloc.free([pages[3]])
    assert alloc.allocate(2) == [pages[3], pages[1]]
