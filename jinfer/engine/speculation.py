"""Host side of speculative decoding: how many drafts each decode row gets, n-gram proposals, and the
acceptance bookkeeping behind the fallback to plain decoding.

Which rows draft: a decoding request without repetition / presence / frequency penalties (those would
change within a speculated run), with room for at least one draft below max_tokens, max_model_len
and the step's token budget. k_r = min(k, that room); n-gram rows propose up to k_r tokens and take
k_r = 0 when the context has no match.

Draft heads (method "heads") draft on device, one pass ahead: each pass returns every sampling row's
drafts for its next pass (the pass that completes a prefill too), which the engine stores here
(`store_drafts`) with the request's length. They are used only while the request still has that
length (they continue exactly its tokens); a row without such drafts takes k_r = 0. A request's
drafts are dropped when it is preempted (its recomputation drafts afresh) or finishes.

Fallback rule: each request keeps an exponential average of its acceptance, a <- a / 2 + (accepted /
drafted) / 2 after every pass with drafts, starting at 1. While a < `min_acceptance` the request
decodes plainly (k_r = 0), except that every `RETRY_AFTER`-th of those steps probes again with drafts
(a good probe lifts the average back over the threshold).
"""

from __future__ import annotations

import dataclasses

from jinfer.engine.batch import uses_penalties
from jinfer.engine.request import Request
from jinfer.speculative import SpeculativeConfig, propose_ngram

RETRY_AFTER = 16


@dataclasses.dataclass
class SpeculationStats:
    """Counted over every row-pass with drafts."""

    passes: int = 0  # row-passes that carried drafts
    drafted: int = 0  # drafts proposed
    accepted: int = 0  # drafts kept

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens a row gains per target pass with drafts: the accepted drafts plus the target's own token."""
        return 1 + self.accepted / self.passes if self.passes else 0.0


@dataclasses.dataclass
class _Acceptance:
    average: float = 1.0
    plain_steps: int = 0


class Speculator:
    """Proposes drafts for decode rows (the scheduler's `proposer`) and records how many were kept."""

    def __init__(self, config: SpeculativeConfig):
        self.config = config
        self.stats = SpeculationStats()
        self._acceptance: dict[str, _Acceptance] = {}
        self._head_drafts: dict[str, tuple[int, tuple[int, ...]]] = {}  # request id -> (its length, drafts)

    def __call__(self, request: Request, room: int) -> tuple[int, tuple[int, ...]]:
        """(k_r, drafts) for a decoding request that may take up to `room` drafts; drafts are () when
        the drafter runs on device."""
        params = request.params
        limit = min(self.config.num_tokens, room, params.max_tokens - len(request.output_ids) - 1)
        if limit <= 0 or uses_penalties(params) or self._falls_back(request):
            return 0, ()
        if self.config.method == "ngram":
            drafts = tuple(propose_ngram(request.token_ids, limit, self.config.max_ngram, self.config.min_ngram))
            return len(drafts), drafts
        if self.config.method == "heads":
            drafts = self._stored_drafts(request)[:limit]
            return len(drafts), drafts
        return limit, ()

    def store_drafts(self, request: Request, drafts: tuple[int, ...]) -> None:
        """The drafts a pass computed for `request`'s next pass, valid while it keeps its current length."""
        self._head_drafts[request.request_id] = (request.num_tokens, tuple(drafts))

    def drop_drafts(self, request: Request) -> None:
        self._head_drafts.pop(request.request_id, None)

    def _stored_drafts(self, request: Request) -> tuple[int, ...]:
        length, drafts = self._head_drafts.get(request.request_id, (None, ()))
        return drafts if length == request.num_tokens else ()

    def _falls_back(self, request: Request) -> bool:
        state = self._acceptance.get(request.request_id)
        if state is None or state.average >= self.config.min_acceptance:
            return False
        state.plain_steps += 1
        return state.plain_steps % RETRY_AFTER != 0

    def record(self, request: Request, drafted: int, accepted: int) -> None:
        """After a pass in which `request` ran `drafted` drafts and kept `accepted` of them."""
        self.stats.passes += 1
        self.stats.drafted += drafted
        self.stats.accepted += accepted
        state = self._acceptance.setdefault(request.request_id, _Acceptance())
        state.average = state.average / 2 + accepted / drafted / 2

    def forget(self, request: Request) -> None:
        self._acceptance.pop(request.request_id, None)
        self.drop_drafts(request)
