"""Plain-jnp definitions of ragged paged attention and of the KV-page write: what the kernels must match.

Everything is computed in float32 at full precision; only the result is cast back to the query dtype.
The attention gathers every token's whole row of pages, which is simple and slow: it is a
definition, not a fast path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

INT8_MAX = 127.0


def dequantize(pages, scales):
    """pages: [num_pages, page_size, K, D]; scales: [num_pages, page_size, K] float32 or None -> float32 pages."""
    values = pages.astype(jnp.float32)
    return values if scales is None else values * scales[..., None]


def token_rows(query_start, num_tokens: int):
    """query_start: [R + 1] int32 -> ([T] row of each token, clamped to R - 1; [T] bool, False for padding)."""
    num_rows = query_start.shape[0] - 1
    tokens = jnp.arange(num_tokens, dtype=jnp.int32)
    rows = jnp.searchsorted(query_start[1:], tokens, side="right").astype(jnp.int32)
    return jnp.minimum(rows, num_rows - 1), tokens < query_start[num_rows]


def token_positions(kv_lens, query_start, rows):
    """kv_lens: [R]; query_start: [R + 1]; rows: [T] -> [T] position of each query in its row's sequence."""
    tokens = jnp.arange(rows.shape[0], dtype=jnp.int32)
    q_lens = query_start[rows + 1] - query_start[rows]
    return kv_lens[rows] - q_lens + (tokens - query_start[rows])


def ragged_paged_attention_reference(
    q,
    k_pages,
    v_pages,
    kv_lens,
    page_table,
    query_start,
    *,
    scale: float,
    window: int = 0,
    softcap: float | None = None,
    k_scales=None,
    v_scales=None,
):
    """Causal attention of each row's queries over its paged K/V.

    q: [T, H, D]; k_pages, v_pages: [num_pages, page_size, K, D]; kv_lens: [R] int32;
    page_table: [R, P] int32; query_start: [R + 1] int32; k_scales, v_scales: [num_pages, page_size, K]
    float32 or None -> [T, H, D] in q.dtype. Padding tokens (index >= query_start[R]) give 0.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, kv_heads, _ = k_pages.shape
    span = page_table.shape[1] * page_size
    rows, real = token_rows(query_start, num_tokens)
    positions = token_positions(kv_lens, query_start, rows)
    k = dequantize(k_pages, k_scales)[page_table[rows]].reshape(num_tokens, span, kv_heads, head_dim)
    v = dequantize(v_pages, v_scales)[page_table[rows]].reshape(num_tokens, span, kv_heads, head_dim)

    key_positions = jnp.arange(span, dtype=jnp.int32)[None, :]
    delta = positions[:, None] - key_positions  # [T, span]
    visible = (delta >= 0) & real[:, None]
    if window:
        visible &= delta < window

    groups = num_heads // kv_heads
    queries = q.astype(jnp.float32).reshape(num_tokens, kv_heads, groups, head_dim)
    logits = jnp.einsum("tkgd,tskd->tkgs", queries, k, precision=jax.lax.Precision.HIGHEST) * scale
    if softcap:
        logits = jnp.tanh(logits / softcap) * softcap
    mask = visible[:, None, None, :]
    logits = jnp.where(mask, logits, -jnp.inf)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    weights = jnp.where(mask, jnp.exp(logits - jnp.where(jnp.isfinite(peak), peak, 0.0)), 0.0)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(total > 0, total, 1.0)
    v = jnp.where(visible[:, :, None, None], v, 0.0)
    out = jnp.einsum("tkgs,tskd->tkgd", probs, v, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


def quantize_int8(values):
    """values: [..., D] -> ([..., D] int8, [...] float32 scales) with value ~= int8 * scale.

    Symmetric per vector: scale = max |value| / 127, int8 = floor(value / scale + 0.5) (ties round up;
    Triton has no round-to-nearest-even).
    """
    values = values.astype(jnp.float32)
    scales = jnp.max(jnp.abs(values), axis=-1) / INT8_MAX
    safe = jnp.where(scales > 0, scales, 1.0)
    quantized = jnp.clip(jnp.floor(values / safe[..., None] + 0.5), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return quantized, scales


def write_kv_pages_reference(k_pages, v_pages, new_k, new_v, slots, *, k_scales=None, v_scales=None):
    """Stores each token's K/V at its flat slot (page * page_size + offset).

    k_pages, v_pages: [num_pages, page_size, K, D]; new_k, new_v: [T, K, D]; slots: [T] int32;
    k_scales, v_scales: [num_pages, page_size, K] float32, given iff the pages are int8 (the new
    K/V are then quantized per token and head) -> (k_pages, v_pages) or, with scales,
    (k_pages, v_pages, k_scales, v_scales).
    """
    page_size = k_pages.shape[1]
    pages, offsets = slots // page_size, slots % page_size
    if k_scales is None:
        return (
            k_pages.at[pages, offsets].set(new_k.astype(k_pages.dtype)),
            v_pages.at[pages, offsets].set(new_v.astype(v_pages.dtype)),
        )
    k_int8, k_new_scales = quantize_int8(new_k)
    v_int8, v_new_scales = quantize_int8(new_v)
    return (
        k_pages.at[pages, offsets].set(k_int8),
        v_pages.at[pages, offsets].set(v_int8),
        k_scales.at[pages, offsets].set(k_new_scales),
        v_scales.at[pages, offsets].set(v_new_scales),
    )
