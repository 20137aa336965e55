"""The scheduler on its own (no device): token budget, decodes first, chunked prefill, FCFS, preemption."""

import pytest

from jinfer.config import EngineConfig
from jinfer.engine.page_allocator import PageAllocator
from jinfer.engine.request import Request, Status
from jinfer.engine.scheduler import Scheduler
from jinfer.sampling import SamplingParams


def _request(order, prompt_len, max_tokens=8):
    return Request(f"r{order}", list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens), seed=0, arrival_order=order)


def _complete(schedule, token=7):
    """What the engine does after a step: count computed tokens, append a token where one was sampled."""
    for row in schedule.rows:
        row.request.num_computed = row.start + row.num_tokens
        if row.samples:
            row.request.output_ids.append(token)


def _scheduler(num_pages=64, **overrides):
    config = EngineConfig(**{"max_num_seqs": 4, "max_num_batched_tokens": 16, "page_size": 4, "max_model_len": 128, **overrides})
    return Scheduler(config, PageAllocator(num_pages))


def test_long_prompt_is_chunked_under_the_token_budget():
    scheduler = _scheduler()
    request = _request(0, 40)
    scheduler.add(request)
    chunks = []
    while not request.output_ids:
        schedule = scheduler.schedule()
        assert schedule.num_tokens <= 16
        chunks.append(schedule.rows[0].num_tokens)
        _complete(schedule)
    assert chunks == [16, 16, 8]
    assert len(request.pages) == 10


def test_decodes_are_never_starved_by_a_long_prompt():
    scheduler = _scheduler()
    short = [_request(i, 3) for i in range(3)]
    for request in short:
        scheduler.add(request)
    _complete(scheduler.schedule())
    scheduler.add(_request(9, 100))
    for _ in range(5):
        schedule = scheduler.schedule()
        decoding = [row for row in schedule.rows if row.request in short]
        assert [row.num_tokens for row in decoding] == [1, 1, 1]
        assert schedule.num_tokens == 16
        _complete(schedule)


def test_first_come_first_served_and_max_num_seqs():
    scheduler = _scheduler(max_num_seqs=2)
    requests = [_request(i, 2) for i in range(4)]
    for request in requests:
        scheduler.add(request)
    schedule = scheduler.schedule()
    assert [row.request for row in schedule.rows] == requests[:2]
    assert list(scheduler.waiting) == requests[2:]


def test_newest_running_request_is_preempted_when_pages_run_out():
    scheduler = _scheduler(num_pages=7, max_num_batched_tokens=32)
    old, new = _request(0, 11), _request(1, 11)
    scheduler.add(old)
    scheduler.add(new)
    _complete(scheduler.schedule())
    assert len(old.pages) == len(new.pages) == 3
    for _ in range(2):
        schedule = scheduler.schedule()
        _complete(schedule)
    assert new.status is Status.WAITING and new.num_preemptions == 1 and new.num_computed == 0 and not new.pages
    assert old.status is Status.RUNNING and len(old.output_ids) == 3
    assert scheduler.allocator.num_used == len(old.pages)


def test_finish_returns_pages_and_reports_them_freed():
    scheduler = _scheduler()
    request = _request(0, 9)
    scheduler.add(request)
    _complete(scheduler.schedule())
    pages = list(request.pages)
    scheduler.finish(request, "abort")
    assert scheduler.allocator.num_used == 0
    assert sorted(scheduler.freed_pages) == sorted(pages)
    assert request.finish_reason == "abort" and not scheduler.has_unfinished()


@pytest.mark.parametrize("field", ["max_num_seqs", "page_size", "max_model_len"])
def test_engine_config_rejects_non_positive_values(field):
    with pytest.raises(ValueError, match=f"{field}=0"):
        EngineConfig(**{field: 0})
