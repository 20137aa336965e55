"""Attention ops. The XLA reference paths here define what every kernel must match; the engine's
paged attention runs them, the Pallas kernels, or the native CPU kernel (`jinfer.ops.backend`)."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from jinfer import native
from jinfer.ops import backend as kernel_backend
from pallas_kernels.ragged_paged_attention.reference import quantize_int8

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
    """Whole sequences at once, no cache: the forward used by `Model.logits` and parity tests.

    `kv_cache_dtype="int8"` rounds K and V through the int8 KV cache's quantization (per token and
    head, `quantize_int8`) before attending, so a full-sequence forward (perplexity) sees the values
    an int8 page pool would hold.
    """

    kv_cache_dtype: str = "auto"

    def __call__(self, q, k, v, positions, cache, layer: LayerAttention):
        """q: [B, S, H, D]; k, v: [B, S, K, D]; positions: [B, S] -> ([B, S, H, D], cache unchanged)."""
        if self.kv_cache_dtype == "int8":
            k, v = int8_round_trip(k), int8_round_trip(v)
        return grouped_attention(q, k, v, visible(positions, positions, layer.window), layer), cache


def int8_round_trip(x):
    """x: [..., D] float -> [..., D] in x.dtype: the values the int8 KV cache stores for it."""
    values, scales = quantize_int8(x)
    return (values.astype(jnp.float32) * scales[..., None]).astype(x.dtype)


def write_kv(pages, new, slots):
    """pages: [num_pages, page_size, K, D]; new: [T, K, D]; slots: [T] flat slot ids -> updated pages.

    Indexed as (page, offset), never through a flattened view of the pool: XLA updates the
    donated pool in place that way, while a reshaped scatter copies the whole pool every step.
    """
    page_size = pages.shape[1]
    return pages.at[slots // page_size, slots % page_size].set(new.astype(pages.dtype))


def write_kv_int8(pages, scales, new, slots):
    """pages: [num_pages, page_size, K, D] int8; scales: [num_pages, page_size, K] float32; new: [T, K, D]
    float; slots: [T] -> (pages, scales) with each token's K (or V) of each head quantized (`quantize_int8`)."""
    values, new_scales = quantize_int8(new)
    return write_kv(pages, values, slots), write_kv(scales, new_scales, slots)


class RowSegments(NamedTuple):
    """Pieces of the ragged batch that each lie in one tile of queries and one row, each [NS] int32."""

    tiles: jax.Array  # tile of `tile_len` consecutive tokens the segment lies in
    rows: jax.Array  # row its tokens belong to
    starts: jax.Array  # first token (index in T)
    ends: jax.Array  # one past its last token (== starts for unused entries)


def row_segments(query_start, num_tokens: int, tile_len: int) -> RowSegments:
    """query_start: [R + 1] int32 -> the non-empty (tile, row) intersections, tile by tile.

    Each boundary between rows inside a tile adds one segment, so there are at most
    min(T, T / tile_len + R - 1); the static capacity is that bound, unused entries are empty.
    Padding tokens (past query_start[R]) belong to no segment.
    """
    num_rows = query_start.shape[0] - 1
    num_tiles = -(-num_tokens // tile_len)
    capacity = min(num_tokens, num_tiles + num_rows - 1)
    tile_ids = jnp.arange(num_tiles, dtype=jnp.int32)[:, None]
    starts = jnp.maximum(query_start[None, :-1], tile_ids * tile_len)  # [tiles, R]
    ends = jnp.minimum(query_start[None, 1:], (tile_ids + 1) * tile_len)  # [tiles, R]
    nonempty = (starts < ends).ravel()
    slot = jnp.where(nonempty, jnp.cumsum(nonempty) - 1, capacity)

    def compact(values):  # values: [tiles, R] -> [capacity]
        flat = jnp.broadcast_to(values, starts.shape).ravel()
        return jnp.zeros(capacity, jnp.int32).at[slot].set(flat, mode="drop")

    return RowSegments(compact(tile_ids), compact(jnp.arange(num_rows, dtype=jnp.int32)[None, :]), compact(starts), compact(ends))


def paged_attention_reference(
    q, k_pages, v_pages, positions, query_start, kv_lens, page_table, layer: LayerAttention, k_scales=None, v_scales=None
):
    """Ragged attention over paged K/V: each token attends to its own row's cache up to its position.

    q: [T, H, D]; k_pages, v_pages: [num_pages, page_size, K, D]; positions: [T] int32;
    query_start: [R + 1] int32; kv_lens: [R] int32; page_table: [R, P] int32; k_scales, v_scales:
    [num_pages, page_size, K] float32 for int8 pages (dequantized after the gather), else None
    -> [T, H, D] (padding tokens, past query_start[R], give 0).

    The tokens are cut into tiles of T / R consecutive tokens (the engine's buckets are powers of
    two, so the tiles fit T exactly; otherwise the last one overhangs), and each
    (tile, row) piece gathers its row's pages once and attends with two dots over all its queries
    and KV heads. A decode batch (T = R) is one token per piece; a long prefill chunk is a few
    large pieces instead of one K/V gather per token. Cache slots past a token's position (stale
    or NaN-poisoned pages) are masked out of the scores, and slots past the row's length out of
    the values.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, kv_heads, _ = k_pages.shape
    num_rows, pages_per_row = page_table.shape
    span, groups = pages_per_row * page_size, num_heads // kv_heads
    tile_len = max(1, num_tokens // num_rows)
    segments = row_segments(query_start, num_tokens, tile_len)
    num_segments = segments.tiles.shape[0]
    tokens = segments.tiles[:, None] * tile_len + jnp.arange(tile_len, dtype=jnp.int32)  # [NS, L]
    in_segment = (tokens >= segments.starts[:, None]) & (tokens < segments.ends[:, None])  # [NS, L]
    kv_positions = jnp.arange(span, dtype=positions.dtype)
    mask = visible(positions[tokens], kv_positions[None, :], layer.window) & in_segment[:, :, None]  # [NS, L, span]
    pages = page_table[segments.rows]  # [NS, P]

    def gathered(pool, scales):  # [num_pages, page_size, K, D], [num_pages, page_size, K] or None -> [NS, K, span, D]
        values = pool[pages]
        if scales is not None:
            values = (values.astype(jnp.float32) * scales[pages][..., None]).astype(q.dtype)
        return values.reshape(num_segments, span, kv_heads, head_dim).transpose(0, 2, 1, 3)

    k, v = gathered(k_pages, k_scales), gathered(v_pages, v_scales)
    written = kv_positions[None, :] < kv_lens[segments.rows][:, None]  # [NS, span]
    v = jnp.where(written[:, None, :, None], v, jnp.zeros((), v.dtype))
    queries = q[tokens].reshape(num_segments, tile_len, kv_heads, groups, head_dim).transpose(0, 2, 1, 3, 4)
    queries = queries.reshape(num_segments, kv_heads, tile_len * groups, head_dim)  # [NS, K, L*G, D]
    batch_dims = ((0, 1), (0, 1))
    logits = lax.dot_general(queries, k, (((3,), (3,)), batch_dims), preferred_element_type=jnp.float32) * layer.scale
    if layer.softcap:
        logits = jnp.tanh(logits / layer.softcap) * layer.softcap
    logits = logits.reshape(num_segments, kv_heads, tile_len, groups, span)
    logits = jnp.where(mask[:, None, :, None, :], logits, MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(num_segments, kv_heads, tile_len * groups, span)
    out = lax.dot_general(probs, v, (((3,), (2,)), batch_dims), preferred_element_type=jnp.float32)  # [NS, K, L*G, D]
    out = out.reshape(num_segments, kv_heads, tile_len, groups, head_dim).transpose(0, 2, 1, 3, 4)
    out = jnp.where(in_segment[:, :, None, None, None], out, 0.0).reshape(num_segments, tile_len, num_heads, head_dim)
    num_tiles = -(-num_tokens // tile_len)
    by_tile = jnp.zeros((num_tiles, tile_len, num_heads, head_dim), jnp.float32).at[segments.tiles].add(out)
    return by_tile.reshape(num_tiles * tile_len, num_heads, head_dim)[:num_tokens].astype(q.dtype)


def paged_attention_kernel(q, k, v, cache, slots, kv_lens, page_table, query_start, layer: LayerAttention, interpret: bool):
    """The Pallas path: write_kv_pages, then ragged_paged_attention over the updated pool.

    q: [T, H, D]; k, v: [T, K, D]; cache: {"k", "v"} pages [num_pages, page_size, K, D] (int8 pages with
    {"k_scale", "v_scale"} [num_pages, page_size, K] float32); slots: [T] int32; kv_lens: [R] int32;
    page_table: [R, P] int32; query_start: [R + 1] int32 -> ([T, H, D], cache).
    Tokens past query_start[R] (padding) give 0.
    """
    from pallas_kernels.ragged_paged_attention import ragged_paged_attention, write_kv_pages  # Pallas: imported when used

    if "k_scale" in cache:  # int8 pages: the write kernel quantizes per token and head
        k_pages, v_pages, k_scales, v_scales = write_kv_pages(
            cache["k"], cache["v"], k, v, slots, k_scales=cache["k_scale"], v_scales=cache["v_scale"], interpret=interpret
        )
        new_cache = {"k": k_pages, "v": v_pages, "k_scale": k_scales, "v_scale": v_scales}
    else:
        dtype = cache["k"].dtype
        k_pages, v_pages = write_kv_pages(cache["k"], cache["v"], k.astype(dtype), v.astype(dtype), slots, interpret=interpret)
        new_cache, k_scales, v_scales = {"k": k_pages, "v": v_pages}, None, None
    out = ragged_paged_attention(
        q, k_pages, v_pages, kv_lens, page_table, query_start,
        scale=layer.scale, window=layer.window, softcap=layer.softcap or None, k_scales=k_scales, v_scales=v_scales,
        interpret=interpret,
    )
    return out, new_cache


@flax.struct.dataclass
class PagedAttention:
    """A ragged batch against the KV page pool: writes each token's K/V, then attends through the page table.

    slots: [T] int32 flat cache slot of each token's K/V (padding tokens write into the null page);
    page_table: [R, P] int32 page ids of each row;
    kv_lens: [R] int32 tokens of each row in the cache after this step (0 for padding rows);
    query_start: [R + 1] int32 index in T of each row's first token (a row's tokens are contiguous,
    rows in order). `kernels` (static) picks the XLA reference, the Pallas kernels or, on CPU, the native
    kernel (jinfer.ops.backend).
    """

    slots: jax.Array
    page_table: jax.Array
    kv_lens: jax.Array
    query_start: jax.Array
    kernels: str = flax.struct.field(pytree_node=False, default="auto")

    def __call__(self, q, k, v, positions, cache, layer: LayerAttention):
        """q: [T, H, D]; k, v: [T, K, D]; positions: [T]; cache: {"k", "v"} pages (int8: with {"k_scale",
        "v_scale"}) -> ([T, H, D], cache)."""
        mode = kernel_backend.resolve(self.kernels)
        if kernel_backend.runs_pallas(mode):
            return paged_attention_kernel(
                q, k, v, cache, self.slots, self.kv_lens, self.page_table, self.query_start, layer, interpret=mode == "interpret"
            )
        if "k_scale" in cache:
            k_pages, k_scales = write_kv_int8(cache["k"], cache["k_scale"], k, self.slots)
            v_pages, v_scales = write_kv_int8(cache["v"], cache["v_scale"], v, self.slots)
            new_cache = {"k": k_pages, "v": v_pages, "k_scale": k_scales, "v_scale": v_scales}
        else:
            k_pages, v_pages = write_kv(cache["k"], k, self.slots), write_kv(cache["v"], v, self.slots)
            new_cache, k_scales, v_scales = {"k": k_pages, "v": v_pages}, None, None
        if mode == "native" and native.supports_paged_attention(q, k_pages):
            out = native.paged_attention(
                q, k_pages, v_pages, positions, self.query_start, self.kv_lens, self.page_table,
                layer.scale, layer.window, layer.softcap, k_scales, v_scales,
            )
        else:
            out = paged_attention_reference(
                q, k_pages, v_pages, positions, self.query_start, self.kv_lens, self.page_table, layer, k_scales, v_scales
            )
        return out, new_cache
