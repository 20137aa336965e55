"""Attention ops. The XLA reference paths here define what every kernel must match; the engine's
paged attention runs either them or the Pallas kernels (`jinfer.ops.backend`)."""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from jinfer.ops import backend as kernel_backend
from pallas_kernels.ragged_paged_attention import ragged_paged_attention, write_kv_pages

MASKED = -1e30


@dataclasses.dataclass(frozen=True)
class LayerAttention:
    """Static per-layer attention settings."""

    scale: float
    window: int = 0  # 0: full causal attention; w > 0: a query at p sees keys at p - w < q <= p
    softcap: float | None = None


def visible(q_positions, kv_positions, window: int):
    """q_positions: [..., S], kv_positions: [..., T] -> bool [..., S, T] (causal, optionally windowed)."""
    delta = q_positions[..., :, None] - kv_positions[..., None, :]
    mask = delta >= 0
    if window:
        mask &= delta < window
    return mask


def grouped_attention(q, k, v, mask, layer: LayerAttention):
    """Masked softmax attention with grouped KV heads, float32 logits and softmax.

    q: [B, S, H, D]; k, v: [B, T, K, D] with H a multiple of K; mask: [B, S, T] bool -> [B, S, H, D].
    """
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim)
    logits = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32) * layer.scale
    if layer.softcap:
        logits = jnp.tanh(logits / layer.softcap) * layer.softcap
    logits = jnp.where(mask[:, None, None], logits, MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, seq, heads, head_dim).astype(q.dtype)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class FullSequenceAttention:
    """Whole sequences at once, no cache: the forward used by `Model.logits` and parity tests."""

    def __call__(self, q, k, v, positions, cache, layer: LayerAttention):
        """q: [B, S, H, D]; k, v: [B, S, K, D]; positions: [B, S] -> ([B, S, H, D], cache unchanged)."""
        return grouped_attention(q, k, v, visible(positions, positions, layer.window), layer), cache


def write_kv(pages, new, slots):
    """pages: [num_pages, page_size, K, D]; new: [T, K, D]; slots: [T] flat slot ids -> updated pages.

    Indexed as (page, offset), never through a flattened view of the pool: XLA updates the
    donated pool in place that way, while a reshaped scatter copies the whole pool every step.
    """
    page_size = pages.shape[1]
    return pages.at[slots // page_size, slots % page_size].set(new.astype(pages.dtype))


def paged_attention_reference(q, k_pages, v_pages, positions, token_rows, page_table, layer: LayerAttention):
    """Ragged attention over paged K/V: each token attends to its own row's cache up to its position.

    q: [T, H, D]; k_pages, v_pages: [num_pages, page_size, K, D]; positions, token_rows: [T] int32;
    page_table: [R, P] int32 page ids per row -> [T, H, D]. Cache slots past a token's position
    (stale or NaN-poisoned pages) are masked out of both the scores and the values. The gathered
    K/V are laid out [T, K, span, D] so both products are dots batched over (token, KV head), the
    form XLA:CPU hands to its matmul routine.
    """
    _, page_size, kv_heads, head_dim = k_pages.shape
    pages = page_table[token_rows]  # [T, P]
    num_tokens, pages_per_row = pages.shape
    span = pages_per_row * page_size

    def gathered(pool):  # [num_pages, page_size, K, D] -> [T, K, span, D]
        return pool[pages].reshape(num_tokens, span, kv_heads, head_dim).transpose(0, 2, 1, 3)

    mask = visible(positions[:, None], jnp.arange(span, dtype=positions.dtype)[None, :], layer.window)[:, 0]  # [T, span]
    k, v = gathered(k_pages), gathered(v_pages)
    v = jnp.where(mask[:, None, :, None], v, jnp.zeros((), v.dtype))
    grouped_q = q.reshape(num_tokens, kv_heads, -1, head_dim)  # [T, K, G, D]
    batch_dims = ((0, 1), (0, 1))
    logits = lax.dot_general(grouped_q, k, (((3,), (3,)), batch_dims), preferred_element_type=jnp.float32) * layer.scale
    if layer.softcap:
        logits = jnp.tanh(logits / layer.softcap) * layer.softcap
    logits = jnp.where(mask[:, None, None, :], logits, MASKED)  # [T, K, G, span]
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = lax.dot_general(probs, v, (((3,), (2,)), batch_dims), preferred_element_type=jnp.float32)  # [T, K, G, D]
    return out.reshape(q.shape).astype(q.dtype)


def paged_attention_kernel(q, k, v, cache, slots, kv_lens, page_table, query_start, layer: LayerAttention, interpret: bool):
    """The Pallas path: write_kv_pages, then ragged_paged_attention over the updated pool.

    q: [T, H, D]; k, v: [T, K, D]; cache: {"k", "v"} pages [num_pages, page_size, K, D]; slots: [T] int32;
    kv_lens: [R] int32; page_table: [R, P] int32; query_start: [R + 1] int32 -> ([T, H, D], cache).
    Tokens past query_start[R] (padding) give 0.
    """
    dtype = cache["k"].dtype
    k_pages, v_pages = write_kv_pages(cache["k"], cache["v"], k.astype(dtype), v.astype(dtype), slots, interpret=interpret)
    out = ragged_paged_attention(
        q, k_pages, v_pages, kv_lens, page_table, query_start,
        scale=layer.scale, window=layer.window, softcap=layer.softcap or None, interpret=interpret,
    )
    return out, {"k": k_pages, "v": v_pages}


@flax.struct.dataclass
class PagedAttention:
    """A ragged batch against the KV page pool: writes each token's K/V, then attends through the page table.

    token_rows: [T] int32 row of each token; slots: [T] int32 flat cache slot of each token's K/V
    (padding tokens write into the null page); page_table: [R, P] int32 page ids of each row;
    kv_lens: [R] int32 tokens of each row in the cache after this step (0 for padding rows);
    query_start: [R + 1] int32 index in T of each row's first token (a row's tokens are contiguous,
    rows in order). `kernels` (static) picks the XLA reference or the Pallas kernels (jinfer.ops.backend).
    """

    token_rows: jax.Array
    slots: jax.Array
    page_table: jax.Array
    kv_lens: jax.Array
    query_start: jax.Array
    kernels: str = flax.struct.field(pytree_node=False, default="auto")

    def __call__(self, q, k, v, positions, cache, layer: LayerAttention):
        """q: [T, H, D]; k, v: [T, K, D]; positions: [T]; cache: {"k", "v"} pages -> ([T, H, D], cache)."""
        mode = kernel_backend.resolve(self.kernels)
        if mode != "reference":
            return paged_attention_kernel(
                q, k, v, cache, self.slots, self.kv_lens, self.page_table, self.query_start, layer, interpret=mode == "interpret"
            )
        k_pages = write_kv(cache["k"], k, self.slots)
        v_pages = write_kv(cache["v"], v, self.slots)
        out = paged_attention_reference(q, k_pages, v_pages, positions, self.token_rows, self.page_table, layer)
        return out, {"k": k_pages, "v": v_pages}
