"""Several decode steps in one program: a `lax.scan` over the engine step, each sampled token fed
back on device.

    decode_loop(params, kv_cache, batch) -> (kv_cache, SampleResult with a leading [N] axis)

`batch.step` is a StepBatch in which every real row decodes one token, row i's token being token i
(as `build_batch` lays out a schedule of decodes only), and every row holds the pages of its next N
positions. Iteration s runs `step`'s computation and samples with `keys[s]`: the key a lone step
would use for that output index, so the loop's tokens equal those of N single steps. The host keeps
each row's tokens up to its first stop (a stop token or string, `max_tokens`) and drops the rest;
their K/V lie past the row's committed length, where nothing reads them.

What it saves is the host's work between steps (scheduling, building and sending the batch, reading
the tokens back), paid once per N tokens instead of once per token.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from jinfer.config import ModelConfig
from jinfer.sampling import SampleResult
from jinfer.step import StepBatch, forward_and_sample


@flax.struct.dataclass
class DecodeLoopBatch:
    step: StepBatch  # the first iteration's batch: one decode token per real row
    keys: jax.Array  # [N, R, 2] uint32 sampling keys of each iteration (see SamplingBatch.keys)
    page_size: int = flax.struct.field(pytree_node=False, default=16)  # static: tokens per KV page


def advance(batch: StepBatch, sampled, page_size: int) -> StepBatch:
    """The next decode step of the same rows: each real row's sampled token at its next position.

    sampled: [R] int32 tokens the step just sampled. Padding tokens and rows stay as they were.
    """
    num_tokens, num_rows = batch.tokens.shape[0], batch.kv_lens.shape[0]
    live_token = jnp.arange(num_tokens) < batch.query_start[-1]  # [T]
    live_row = jnp.arange(num_rows) < batch.query_start[-1]  # [R]
    row = jnp.minimum(jnp.arange(num_tokens), num_rows - 1)  # [T] token i belongs to row i
    positions = batch.positions + live_token
    page = batch.page_table[row, jnp.minimum(positions // page_size, batch.page_table.shape[1] - 1)]
    history = batch.history
    if history.shape[1]:
        column = jnp.where(live_row, batch.history_lens, history.shape[1])  # padding rows write nowhere
        history = history.at[jnp.arange(num_rows), column].set(sampled, mode="drop")
    return batch.replace(
        tokens=jnp.where(live_token, sampled[row], batch.tokens),
        positions=positions,
        slots=jnp.where(live_token, page * page_size + positions % page_size, batch.slots),
        kv_lens=batch.kv_lens + live_row,
        history=history,
        history_lens=batch.history_lens + live_row * (history.shape[1] > 0),
    )


@functools.partial(jax.jit, static_argnames=("config", "dtype"), donate_argnames=("kv_cache",))
def decode_loop(params, kv_cache, batch: DecodeLoopBatch, *, config: ModelConfig, dtype) -> tuple[object, SampleResult]:
    def one_step(carry, keys):
        kv_cache, step_batch = carry
        step_batch = step_batch.replace(sampling=step_batch.sampling.replace(keys=keys))
        kv_cache, output = forward_and_sample(params, kv_cache, step_batch, config, dtype)
        return (kv_cache, advance(step_batch, output.sampled.tokens, batch.page_size)), output.sampled

    (kv_cache, _), sampled = lax.scan(one_step, (kv_cache, batch.step), batch.keys)
    return kv_cache, sampled
