"""Host side of a step: a Schedule -> fixed-shape numpy arrays padded to the step's bucket."""

from __future__ import annotations

import bisect

import numpy as np

from jinfer.cache import NULL_PAGE, slots_for
from jinfer.config import EngineConfig, ModelConfig
from jinfer.engine.scheduler import Schedule
from jinfer.decode_loop import DecodeLoopBatch
from jinfer.sampling import SamplingBatch, step_keys
from jinfer.speculative_step import SpeculativeBatch
from jinfer.step import StepBatch


def bucket(sizes: tuple[int, ...], needed: int) -> int:
    """The smallest size in `sizes` (ascending) that holds `needed`."""
    return sizes[bisect.bisect_left(sizes, needed)]


def uses_penalties(params) -> bool:
    return params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0


def build_batch(schedule: Schedule, config: EngineConfig) -> StepBatch:
    """A speculating row's chunk is its last token followed by its drafts (zeros when they are drafted
    on device), at the next positions; its logits index stays at the last token."""
    rows = schedule.rows
    num_tokens = bucket(config.token_buckets, schedule.num_tokens)
    num_rows = bucket(config.seq_buckets, len(rows))
    pages_per_row = bucket(config.page_buckets, max(len(row.request.pages) for row in rows))
    page_size = config.page_size

    tokens = np.zeros(num_tokens, np.int32)
    positions = np.zeros(num_tokens, np.int32)
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
        length = row.num_tokens + row.num_drafts
        span = slice(cursor, cursor + length)
        chunk_positions = np.arange(row.start, row.start + length)
        tokens[cursor : cursor + row.num_tokens] = ids[row.start : row.start + row.num_tokens]
        tokens[cursor + row.num_tokens : cursor + row.num_tokens + len(row.drafts)] = row.drafts
        positions[span] = chunk_positions
        slots[span] = slots_for(np.asarray(request.pages), chunk_positions, page_size)
        page_table[i, : len(request.pages)] = request.pages
        kv_lens[i] = row.start + length
        query_start[i] = cursor
        logits_index[i] = cursor + row.num_tokens - 1
        if history_width and row.samples:
            history[i, : len(ids)] = ids
            prompt_lens[i] = len(request.prompt_ids)
            history_lens[i] = len(ids)
        cursor += length

    sampling = SamplingBatch.from_params(
        [row.request.params for row in rows],
        [(row.request.seed, len(row.request.output_ids)) for row in rows],
        pad_to=num_rows,
    )
    return StepBatch(
        tokens=tokens,
        positions=positions,
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


def speculative_batch(
    schedule: Schedule, step_batch: StepBatch, width: int, method: str, draft_layers: int = 0, draft_config: ModelConfig | None = None
) -> SpeculativeBatch:
    """Wraps a built batch for `speculative_step`: `width` (K) is the static number of draft slots per row;
    an all-greedy schedule gets the greedy-only program."""
    num_rows = step_batch.logits_index.shape[0]
    num_drafts = np.zeros(num_rows, np.int32)
    draft_tokens = np.zeros((num_rows, width), np.int32)
    for i, row in enumerate(schedule.rows):
        num_drafts[i] = row.num_drafts
        draft_tokens[i, : len(row.drafts)] = row.drafts
    offsets = np.minimum(np.arange(width + 1)[None, :], num_drafts[:, None])  # [R, K+1]
    return SpeculativeBatch(
        step=step_batch,
        verify_index=(step_batch.logits_index[:, None] + offsets).astype(np.int32),
        draft_tokens=draft_tokens,
        num_drafts=num_drafts,
        method=method,
        draft_layers=draft_layers,
        draft_config=draft_config,
        sampled=any(row.request.params.temperature > 0 for row in schedule.rows),
    )


def decode_loop_batch(schedule: Schedule, step_batch: StepBatch, num_steps: int, page_size: int) -> DecodeLoopBatch:
    """Wraps a built batch of decodes for `decode_loop`: iteration s samples each row's next output
    index + s with the key a single step would use for it."""
    rows = len(schedule.rows)
    seeds = np.tile(np.asarray([row.request.seed for row in schedule.rows], np.uint64), num_steps)
    indices = np.add.outer(np.arange(num_steps), [len(row.request.output_ids) for row in schedule.rows]).ravel()
    keys = np.zeros((num_steps, *step_batch.sampling.keys.shape), np.uint32)
    keys[:, :rows] = step_keys(seeds, indices).reshape(num_steps, rows, 2)
    return DecodeLoopBatch(step=step_batch, keys=keys, page_size=page_size)


def padding_batch(config: EngineConfig, num_tokens: int, num_rows: int, pages_per_row: int) -> StepBatch:
    """An all-padding batch of the given bucket: every token writes to and reads the null page."""
    rows = np.zeros(num_rows, np.int32)  # also kv_lens: no row has tokens
    return StepBatch(
        tokens=np.zeros(num_tokens, np.int32),
        positions=np.zeros(num_tokens, np.int32),
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
