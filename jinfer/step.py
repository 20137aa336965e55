"""The jitted engine step: one ragged batch of prefill chunks and decode tokens -> next tokens.

    step(params, kv_cache, batch) -> (kv_cache, StepOutput)

`batch` holds fixed-shape arrays padded to a bucket (tokens T, rows R, pages per row P), so a new
mix of requests never recompiles; the KV cache is donated and updated in place. The batch's static
`kernels` field picks the XLA references or the Pallas kernels for the hot ops (jinfer.ops.backend);
being static, it is part of the compiled program's key.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from jinfer.config import ModelConfig
from jinfer.models.transformer import Transformer
from jinfer.ops.attention import PagedAttention
from jinfer.ops.backend import kernel_scope
from jinfer.sampling import MAX_LOGPROBS, SampleResult, SamplingBatch, apply_penalties, sample, token_counts


@flax.struct.dataclass
class StepBatch:
    tokens: jax.Array  # [T] int32 token ids (padding: 0)
    positions: jax.Array  # [T] int32 position of each token in its sequence
    slots: jax.Array  # [T] int32 flat KV slot each token writes (padding: the null page)
    page_table: jax.Array  # [R, P] int32 pages of each row (padding: the null page)
    kv_lens: jax.Array  # [R] int32 tokens of each row in the cache once this step's are written (padding: 0)
    query_start: jax.Array  # [R + 1] int32 index in T of each row's first token; then the real token count
    logits_index: jax.Array  # [R] int32 index in T of each row's last token
    history: jax.Array  # [R, Hist] int32 prompt + output ids for penalties (Hist = 0 when no row uses them)
    prompt_lens: jax.Array  # [R] int32 prompt length of each row
    history_lens: jax.Array  # [R] int32 valid length of `history`
    sampling: SamplingBatch  # [R] rows of sampling parameters and keys
    kernels: str = flax.struct.field(pytree_node=False, default="auto")  # static: a jinfer.ops.backend mode


@flax.struct.dataclass
class StepOutput:
    sampled: SampleResult  # tokens [R], logprob [R], top_ids / top_logprobs [R, n]
    logits: jax.Array  # [R, V] float32 logits each row sampled from (after penalties)


def penalised(logits, batch: StepBatch):
    """logits: [R, V] -> penalised logits; a no-op shape-wise when the batch carries no history."""
    if batch.history.shape[1] == 0:
        return logits
    vocab = logits.shape[-1]
    prompt_counts = token_counts(batch.history, batch.prompt_lens, vocab)
    output_counts = token_counts(batch.history, batch.history_lens, vocab) - prompt_counts
    return apply_penalties(logits, batch.sampling, prompt_counts > 0, output_counts)


def forward_and_sample(params, kv_cache, batch: StepBatch, config: ModelConfig, dtype) -> tuple[object, StepOutput]:
    """The step's computation, unjitted (`decode_loop` runs it in a scan)."""
    backend = PagedAttention(batch.slots, batch.page_table, batch.kv_lens, batch.query_start, batch.kernels)
    with kernel_scope(batch.kernels):
        logits, kv_cache = Transformer(config, dtype).apply(
            {"params": params}, batch.tokens, batch.positions, backend, kv_cache, logits_index=batch.logits_index
        )
        logits = penalised(logits, batch)
        return kv_cache, StepOutput(sample(logits, batch.sampling, MAX_LOGPROBS), logits)


@functools.partial(jax.jit, static_argnames=("config", "dtype"), donate_argnames=("kv_cache",))
def step(params, kv_cache, batch: StepBatch, *, config: ModelConfig, dtype):
    return forward_and_sample(params, kv_cache, batch, config, dtype)
