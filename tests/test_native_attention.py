"""jinfer's native CPU paged attention (jinfer/native/attention.cc) against the engine's XLA reference,
`paged_attention_reference`, over ragged batches (decodes, prefill chunks, long contexts, empty rows,
padding tokens), float32 and int8 pages, with every unused page slot poisoned with NaN; and the
engine's attention picking it in kernel mode "native" only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer import native
from jinfer.ops.attention import LayerAttention, PagedAttention, paged_attention_reference
from pallas_kernels.testing import assert_close
from test_ragged_paged_attention import decode_rows, make_batch, mixed_rows

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU kernels")

REFERENCE = jax.jit(paged_attention_reference, static_argnums=7)


def long_rows(page_size, pages_per_row):
    """Prefill chunks longer than a unit of work (16 tokens) over contexts of many 16-position blocks."""
    longest = pages_per_row * page_size
    return [(37, longest), (1, longest - 9), (16, 40), (17, 17)]


def token_positions(batch) -> np.ndarray:
    """[T] int32: each row's new tokens sit at the end of its cache; padding tokens at 0."""
    real = int(batch.query_start[-1])
    token_rows = np.repeat(np.arange(len(batch.kv_lens)), np.diff(batch.query_start))
    q_lens = np.diff(batch.query_start)[token_rows]
    positions = batch.kv_lens[token_rows] - q_lens + (np.arange(real) - batch.query_start[token_rows])
    return np.pad(positions, (0, len(batch.q) - real)).astype(np.int32)


def attend_both_ways(batch, layer: LayerAttention):
    q, k_pages, v_pages, kv_lens, page_table, query_start = batch.args()
    positions = jnp.asarray(token_positions(batch))
    scales = batch.scales()
    k_scales, v_scales = scales.get("k_scales"), scales.get("v_scales")
    expected = REFERENCE(q, k_pages, v_pages, positions, query_start, kv_lens, page_table, layer, k_scales, v_scales)
    actual = jax.jit(native.paged_attention, static_argnums=(7, 8, 9))(
        q, k_pages, v_pages, positions, query_start, kv_lens, page_table, layer.scale, layer.window, layer.softcap,
        k_scales, v_scales,
    )
    return np.asarray(actual), np.asarray(expected)


@pytest.mark.parametrize("window, softcap, int8", [(0, None, False), (6, 30.0, False), (21, None, False), (0, None, True), (6, 30.0, True)])
@pytest.mark.parametrize(
    "rows, num_tokens, pages_per_row",
    [(mixed_rows, 64, 4), (decode_rows, 8, 4), (long_rows, 80, 9)],
    ids=["mixed", "decodes", "long"],
)
@pytest.mark.parametrize("page_size", (8, 16))
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 16), (9, 3, 64), (4, 1, 32)])
def test_native_attention_matches_the_reference(window, softcap, int8, rows, num_tokens, pages_per_row, page_size, heads, kv_heads, head_dim):
    """int8 pages: NaN scales on every unused slot."""
    batch = make_batch(
        rows(page_size, pages_per_row), num_tokens=num_tokens, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        page_size=page_size, pages_per_row=pages_per_row, dtype=np.float32, int8=int8,
    )
    actual, expected = attend_both_ways(batch, LayerAttention(scale=head_dim**-0.5, window=window, softcap=softcap))
    real = int(batch.query_start[-1])
    assert np.all(np.isfinite(actual)), "a NaN-poisoned slot was read"
    assert np.all(actual[real:] == 0.0), "padding tokens must give 0"
    assert_close(actual, expected)


def test_scores_far_apart_do_not_overflow():
    """Logits of ~±80 (softmax by the running maximum, exp of very negative differences)."""
    batch = make_batch(
        long_rows(16, 9), num_tokens=80, heads=4, kv_heads=2, head_dim=16, page_size=16, pages_per_row=9, dtype=np.float32
    )
    batch.q *= 20.0
    actual, expected = attend_both_ways(batch, LayerAttention(scale=1.0))
    assert np.all(np.isfinite(actual))
    assert_close(actual, expected)


def _lowered_text(attention: PagedAttention, q, k, v, positions, cache) -> str:
    layer = LayerAttention(scale=0.125)
    return jax.jit(lambda *args: attention(*args, layer)).lower(q, k, v, positions, cache).as_text()


@pytest.mark.parametrize(
    "kernels, int8, target",
    [("native", False, "jinfer_paged_attention_f32"), ("reference", False, None), ("native", True, "jinfer_paged_attention_int8")],
)
def test_the_engine_attention_runs_the_native_kernel_in_native_mode(kernels, int8, target):
    pool = (5, 8, 2, 64)
    if int8:
        cache = {"k": jnp.zeros(pool, jnp.int8), "v": jnp.zeros(pool, jnp.int8), "k_scale": jnp.ones(pool[:3]), "v_scale": jnp.ones(pool[:3])}
    else:
        cache = {"k": jnp.zeros(pool), "v": jnp.zeros(pool)}
    attention = PagedAttention(
        slots=jnp.array([9, 17]), page_table=jnp.array([[1, 2], [2, 3]]), kv_lens=jnp.array([2, 2]),
        query_start=jnp.array([0, 1, 2]), kernels=kernels,
    )
    q, kv = jnp.ones((2, 4, 64)), jnp.ones((2, 2, 64))
    text = _lowered_text(attention, q, kv, kv, jnp.array([1, 1]), cache)
    assert ("jinfer_paged_attention" in text) == (target is not None)
    assert target is None or target in text
