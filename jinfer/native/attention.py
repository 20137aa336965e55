"""XLA FFI calls of the paged attention kernel in attention.cc, and the pools it takes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.native import library
from jinfer.native.library import LANES


def supports_paged_attention(q, k_pages) -> bool:
    """q: [T, H, D]; k_pages: [num_pages, page_size, K, D]: float32 queries, float32 or int8 pages, D a
    whole number of vectors."""
    return q.dtype == jnp.float32 and k_pages.dtype in (jnp.float32, jnp.int8) and q.shape[-1] % LANES == 0


def paged_attention(
    q, k_pages, v_pages, positions, query_start, kv_lens, page_table, scale: float, window: int, softcap: float | None,
    k_scales=None, v_scales=None,
):
    """What `jinfer.ops.attention.paged_attention_reference` computes, reading K/V in place in the pool.

    q: [T, H, D] float32; k_pages, v_pages: [num_pages, page_size, K, D] float32, or int8 with k_scales,
    v_scales: [num_pages, page_size, K] float32; positions: [T] int32; query_start: [R + 1] int32;
    kv_lens: [R] int32; page_table: [R, P] int32 -> [T, H, D] float32 (padding tokens, past
    query_start[R], give 0).
    """
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    pages = (k_pages, v_pages) if k_scales is None else (k_pages, v_pages, k_scales, v_scales)
    target = "jinfer_paged_attention_f32" if k_scales is None else "jinfer_paged_attention_int8"
    return library.ffi_call(target, out)(
        q, *pages, positions, query_start, kv_lens, page_table,
        scale=np.float32(scale), window=np.int64(window), softcap=np.float32(softcap or 0.0),
    )
