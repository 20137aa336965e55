"""Host side of a step: a Schedule -> fixed-shape numpy arrays padded to the step's bucket."""

from __future__ import annotations

import bisect

import numpy as np

from jinfer.cache import NULL_PAGE, slots_for
from jinfer.config import EngineConfig
from jinfer.engine.scheduler import Schedule
from jinfer.sampling import SamplingBatch
from jinfer.step import StepBatch


def bucket(sizes: tuple[int, ...], needed: int) -> int:
    """The smallest size in `sizes` (ascending) that holds `needed`."""
    return sizes[bisect.bisect_left(sizes, needed)]


def uses_penalties(params) -> bool:
    return params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0


def build_batch(schedule: Schedule, config: EngineConfig) -> StepBatch:
    rows = schedule.rows
    num_tokens = bucket(config.token_buckets, schedule.num_tokens)
    num_rows = bucket(config.seq_buckets, len(rows))
    pages_per_row = bucket(config.page_buckets, max(len(row.request.pages) for row in rows))
    page_size = config.page_size

    tokens = np.zeros(num_tokens, np.int32)
    positions = np.zeros(num_tokens, np.int32)
    token_rows = np.zeros(num_tokens, np.int32)
    slots = np.full(num_tokens, NULL_PAGE * page_size, np.int32)
    page_table = np.full((num_rows, pages_per_row), NULL_PAGE, np.int32)
    kv_lens = np.zeros(num_rows, np.int32)
    query_start = np.full(num_rows + 1, schedule.num_tokens, np.int32)  # padding rows: no tokens
    logits_index = np.zeros(num_rows, np.int32)
    history_width = pages_per_row * page_size if any(uses_penalties(r.request.params) for r in rows) else 0
    history = np.zeros((num_rows, history_width), np.int32)
    prompt_lens = np.zeros(num_rows, np.int32)
    history_lens = np.zeros(num_rows, np.int32)

    cursor = 0
    for i, row in enumerate(rows):
        request = row.request
        ids = request.token_ids
        span = slice(cursor, cursor + row.num_tokens)
        chunk_positions = np.arange(row.start, row.start + row.num_tokens)
        tokens[span] = ids[row.start : row.start + row.num_tokens]
        positions[span] = chunk_positions
        token_rows[span] = i
        slots[span] = slots_for(np.asarray(request.pages), chunk_positions, page_size)
        page_table[i, : len(request.pages)] = request.pages
        kv_lens[i] = row.start + row.num_tokens
        query_start[i] = cursor
        logits_index[i] = cursor + row.num_tokens - 1
        if history_width and row.samples:
            history[i, : len(ids)] = ids
            prompt_lens[i] = len(request.prompt_ids)
            history_lens[i] = len(ids)
        cursor += row.num_tokens

    sampling = SamplingBatch.from_params(
        [row.request.params for row in rows],
        [(row.request.seed, len(row.request.output_ids)) for row in rows],
        pad_to=num_rows,
    )
    return StepBatch(
        tokens=tokens,
        positions=positions,
        token_rows=token_rows,
        slots=slots,
        page_table=page_table,
        kv_lens=kv_lens,
        query_start=query_start,
        logits_index=logits_index,
        history=history,
        prompt_lens=prompt_lens,
        history_lens=history_lens,
        sampling=sampling,
        kernels=config.kernels,
    )


def padding_batch(config: EngineConfig, num_tokens: int, num_rows: int, pages_per_row: int) -> StepBatch:
    """An all-padding batch of the given bucket: every token writes to and reads the null page."""
    rows = np.zeros(num_rows, np.int32)  # also kv_lens: no row has tokens
    return StepBatch(
        tokens=np.zeros(num_tokens, np.int32),
        positions=np.zeros(num_tokens, np.int32),
        token_rows=np.zeros(num_tokens, np.int32),
        slots=np.full(num_tokens, NULL_PAGE * config.page_size, np.int32),
        page_table=np.full((num_rows, pages_per_row), NULL_PAGE, np.int32),
        kv_lens=rows,
        query_start=np.zeros(num_rows + 1, np.int32),
        logits_index=rows,
        history=np.zeros((num_rows, 0), np.int32),
        prompt_lens=rows,
        history_lens=rows,
        sampling=SamplingBatch.from_params([], [], pad_to=num_rows),
        kernels=config.kernels,
    )
