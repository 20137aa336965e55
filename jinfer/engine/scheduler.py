"""First come, first served scheduling under a per-step token budget, with pages from the allocator.

Each step: every running decode gets one token first (long prompts never starve them), then
prompt chunks fill the rest of the budget (chunked prefill), oldest request first. When pages run
out, the newest running request is preempted: its pages are freed and it is recomputed later.

With speculative decoding a `proposer` gives each decode row k_r drafts (within the token budget,
the request's room and the free pages); the row then needs pages for its tokens plus the k_r drafts. A request
holds exactly the pages its next step needs: pages past that (left over from drafts that were
rejected, or from a larger k before) are released when it is scheduled again.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

from jinfer.config import EngineConfig
from jinfer.engine.page_allocator import PageAllocator
from jinfer.engine.request import Request, Status


@dataclasses.dataclass(frozen=True)
class ScheduledRow:
    """`request` runs `token_ids[start : start + num_tokens]` this step, then `num_drafts` speculative
    tokens: `drafts` when proposed on the host, else drafted on device."""

    request: Request
    start: int
    num_tokens: int
    num_drafts: int = 0
    drafts: tuple[int, ...] = ()

    @property
    def samples(self) -> bool:
        """The chunk reaches the last known token, so the step's output is the next token."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclasses.dataclass
class Schedule:
    rows: list[ScheduledRow]
    preempted: list[Request]

    @property
    def num_tokens(self) -> int:
        """Tokens the step runs: chunks and drafts."""
        return sum(row.num_tokens + row.num_drafts for row in self.rows)

    @property
    def speculates(self) -> bool:
        return any(row.num_drafts for row in self.rows)


Proposer = Callable[[Request, int], tuple[int, tuple[int, ...]]]  # (request, most drafts) -> (k_r, host drafts or ())


class Scheduler:
    def __init__(self, config: EngineConfig, allocator: PageAllocator, proposer: Proposer | None = None):
        self.config = config
        self.allocator = allocator
        self.proposer = proposer
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.freed_pages: list[int] = []  # pages whose last reference went away; the engine may poison them

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.config.page_size)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request, reason: str) -> None:
        """Ends a request (done, aborted or failed) and returns its pages."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._release(request)
        request.finish(reason)

    def _release(self, request: Request) -> None:
        self.allocator.free(request.pages)
        self.freed_pages += [page for page in request.pages if self.allocator.refcount(page) == 0]
        request.pages = []

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release(request)
        request.num_computed = 0
        request.status = Status.WAITING
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def _reserve(self, request: Request, num_tokens: int, scheduled: set[int], preempted: list[Request]) -> bool:
        """Gives `request` pages for `num_tokens` tokens, preempting the newest unscheduled running
        requests if needed. False if `request` itself had to be preempted or nothing could be freed."""
        missing = self.pages_needed(num_tokens) - len(request.pages)
        if missing < 0:
            surplus, request.pages = request.pages[missing:], request.pages[:missing]
            self.allocator.free(surplus)
            self.freed_pages += [page for page in surplus if self.allocator.refcount(page) == 0]
            return True
        while not self.allocator.can_allocate(missing):
            victims = [r for r in self.running if id(r) not in scheduled]
            if not victims:
                return False
            victim = max(victims, key=lambda r: r.arrival_order)
            self._preempt(victim)
            preempted.append(victim)
            if victim is request:
                return False
        request.pages += self.allocator.allocate(missing)
        return True

    def reserve_ahead(self, requests: list[Request], num_tokens: int) -> bool:
        """Pages for `num_tokens` more tokens of every request, all or none (nobody is preempted)."""
        missing = [max(self.pages_needed(r.num_tokens + num_tokens) - len(r.pages), 0) for r in requests]
        if not self.allocator.can_allocate(sum(missing)):
            return False
        for request, count in zip(requests, missing):
            request.pages += self.allocator.allocate(count)
        return True

    def _drafts(self, request: Request, spare_tokens: int) -> tuple[int, tuple[int, ...]]:
        """The proposer's drafts for a decode row, within the spare budget and max_model_len; none
        when their pages are not free (drafts never preempt anyone)."""
        room = min(spare_tokens, self.config.max_model_len - request.num_tokens - 1)
        if self.proposer is None or room <= 0:
            return 0, ()
        num_drafts, drafts = self.proposer(request, room)
        missing = self.pages_needed(request.num_tokens + num_drafts) - len(request.pages)
        return (num_drafts, drafts) if self.allocator.can_allocate(max(missing, 0)) else (0, ())

    def schedule(self) -> Schedule:
        budget = self.config.max_num_batched_tokens
        rows: list[ScheduledRow] = []
        scheduled: set[int] = set()
        preempted: list[Request] = []

        def add_row(request: Request, num_tokens: int, num_drafts: int = 0, drafts: tuple[int, ...] = ()) -> None:
            nonlocal budget
            rows.append(ScheduledRow(request, request.num_computed, num_tokens, num_drafts, drafts))
            scheduled.add(id(request))
            budget -= num_tokens + num_drafts

        decoding = sorted((r for r in self.running if r.is_decoding), key=lambda r: r.arrival_order)
        for position, request in enumerate(decoding):
            if len(rows) == self.config.max_num_seqs:
                break
            if request.status is not Status.RUNNING:
                continue
            num_drafts, drafts = self._drafts(request, budget - (len(decoding) - position))
            if self._reserve(request, request.num_tokens + num_drafts, scheduled, preempted):
                add_row(request, 1, num_drafts, drafts)

        prefilling = sorted((r for r in self.running if id(r) not in scheduled and not r.is_decoding), key=lambda r: r.arrival_order)
        for request in prefilling:
            if budget == 0 or len(rows) == self.config.max_num_seqs:
                break
            if request.status is not Status.RUNNING:
                continue
            num_tokens = min(request.num_uncomputed, budget)
            if self._reserve(request, request.num_computed + num_tokens, scheduled, preempted):
                add_row(request, num_tokens)

        while self.waiting and budget > 0 and len(rows) < self.config.max_num_seqs:
            request = self.waiting[0]
            if request in preempted:
                break
            num_tokens = min(request.num_uncomputed, budget)
            missing = self.pages_needed(request.num_computed + num_tokens)
            if not self.allocator.can_allocate(missing):
                break
            self.waiting.popleft()
            request.pages = self.allocator.allocate(missing)
            request.status = Status.RUNNING
            self.running.append(request)
            add_row(request, num_tokens)
        return Schedule(rows, preempted)
