"""Ragged paged attention and the KV-page write: the reference against hand-computed values and the
engine's XLA path; both kernel variants (interpret mode) against the reference over sweeps of dtypes,
page sizes, head ratios, head dims, windows, soft-caps and int8 pages, with every unused page and
slot poisoned with NaN; input validation; lowering for TPU and CUDA at Llama-3-8B shapes."""

from __future__ import annotations

import dataclasses
import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.ops.attention import LayerAttention, PagedAttention, paged_attention_reference
from pallas_kernels.ragged_paged_attention import kernel
from pallas_kernels.ragged_paged_attention.reference import (
    ragged_paged_attention_reference,
    write_kv_pages_reference,
)
from pallas_kernels.testing import assert_close

NAN = float("nan")
TRITON_TARGET = "__gpu$xla.gpu.triton"
# Interpret-mode kernels are large XLA:CPU programs run once or twice: compiling them unoptimized is faster.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


# ----------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Batch:
    """Host arrays of one ragged batch; every pool slot that holds no row's token is NaN (int8: its scale)."""

    q: np.ndarray  # [T, H, D]
    k_pages: np.ndarray  # [num_pages, page_size, K, D]
    v_pages: np.ndarray  # [num_pages, page_size, K, D]
    kv_lens: np.ndarray  # [R] int32
    page_table: np.ndarray  # [R, P] int32
    query_start: np.ndarray  # [R + 1] int32
    k_scales: np.ndarray | None = None  # [num_pages, page_size, K] float32
    v_scales: np.ndarray | None = None  # [num_pages, page_size, K] float32

    def args(self):
        arrays = (self.q, self.k_pages, self.v_pages, self.kv_lens, self.page_table, self.query_start)
        return tuple(jnp.asarray(a) for a in arrays)

    def scales(self):
        if self.k_scales is None:
            return {}
        return {"k_scales": jnp.asarray(self.k_scales), "v_scales": jnp.asarray(self.v_scales)}


def make_batch(rows, *, num_tokens, heads, kv_heads, head_dim, page_size, pages_per_row, dtype, int8=False, seed=0):
    """rows: [(q_len, kv_len)] -> a Batch whose rows own shuffled pages of a pool with spare poisoned pages.

    Page-table entries past a row's pages point to the null page 0; padding queries are NaN.
    """
    rng = np.random.default_rng(seed)
    q_lens, kv_lens = (np.array(v, np.int32) for v in zip(*rows))
    query_start = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    assert query_start[-1] <= num_tokens and np.all(kv_lens <= pages_per_row * page_size)
    num_pages = len(rows) * pages_per_row + 4
    shuffled = iter(rng.permutation(np.arange(1, num_pages)))
    page_table = np.zeros((len(rows), pages_per_row), np.int32)
    written = np.zeros((num_pages, page_size), bool)
    for r, kv_len in enumerate(kv_lens):
        for p in range(-(-kv_len // page_size)):
            page_table[r, p] = next(shuffled)
            written[page_table[r, p], : min(page_size, kv_len - p * page_size)] = True

    q = rng.normal(size=(num_tokens, heads, head_dim)).astype(np.float32)
    q[query_start[-1] :] = NAN
    shape = (num_pages, page_size, kv_heads, head_dim)
    if not int8:
        k, v = (np.where(written[..., None, None], rng.normal(size=shape), NAN) for _ in range(2))
        return Batch(q.astype(dtype), k.astype(dtype), v.astype(dtype), kv_lens, page_table, query_start)
    k, v = (rng.integers(-127, 128, shape).astype(np.int8) for _ in range(2))
    k_scales, v_scales = (
        np.where(written[..., None], rng.uniform(0.002, 0.02, shape[:3]), NAN).astype(np.float32) for _ in range(2)
    )
    return Batch(q.astype(dtype), k, v, kv_lens, page_table, query_start, k_scales, v_scales)


def mixed_rows(page_size, pages_per_row):
    """Decodes, prefill chunks and a whole prefill; kv lengths 0, 1, page_size - 1, page_size, page_size + 1, max."""
    longest = pages_per_row * page_size
    return [
        (1, 1), (1, page_size - 1), (page_size, page_size), (3, page_size + 1),
        (0, 5), (0, 0), (20, longest), (1, longest - 3),
    ]


def decode_rows(page_size, pages_per_row):
    """Another mix of the same row count: decodes only, plus one row with nothing."""
    longest = pages_per_row * page_size
    return [(1, longest), (1, 2), (1, page_size + 1), (0, 0), (1, page_size), (1, 1), (1, longest - 1), (1, 7)]


# ----------------------------------------------------------------------------- reference

REFERENCE = jax.jit(ragged_paged_attention_reference, static_argnames=("scale", "window", "softcap"))


def test_reference_matches_a_case_computed_by_hand():
    # One row, one head, D = 2, page size 2: kv_len 3 with 2 new queries at positions 1 and 2; slot 3 is unused.
    keys = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    values = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    k_pages = np.full((3, 2, 1, 2), NAN, np.float32)
    v_pages = np.full((3, 2, 1, 2), NAN, np.float32)
    k_pages[2, :, 0], k_pages[1, 0, 0] = keys[:2], keys[2]  # the row's pages are [2, 1]
    v_pages[2, :, 0], v_pages[1, 0, 0] = values[:2], values[2]
    q = np.array([[[2.0, 0.0]], [[0.0, 4.0]], [[NAN, NAN]]], np.float32)  # the last token is padding
    out = REFERENCE(
        jnp.asarray(q), jnp.asarray(k_pages), jnp.asarray(v_pages),
        jnp.array([3], jnp.int32), jnp.array([[2, 1]], jnp.int32), jnp.array([0, 2], jnp.int32), scale=0.5,
    )
    # Query at position 1 sees keys 0, 1: logits 0.5 * (2, 0) = (1, 0).
    w1 = np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum()
    # Query at position 2 sees keys 0, 1, 2: logits 0.5 * (0, 4, 4) = (0, 2, 2).
    w2 = np.exp([0.0, 2.0, 2.0]) / np.exp([0.0, 2.0, 2.0]).sum()
    expected = np.array([[w1 @ values[:2]], [w2 @ values], [[0.0, 0.0]]])
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6)
    assert np.all(np.asarray(out)[2] == 0.0)


def test_reference_window_and_softcap_by_hand():
    # Window 2: the query at position 2 sees keys 1 and 2 only. Soft-cap 2: logit x -> 2 tanh(x / 2).
    values = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], np.float32)
    k_pages = np.ones((1, 4, 1, 2), np.float32)
    k_pages[0, 1, 0] = [1.0, 0.0]
    v_pages = np.zeros((1, 4, 1, 2), np.float32)
    v_pages[0, :3, 0] = values
    out = REFERENCE(
        jnp.asarray(np.array([[[1.0, 2.0]]], np.float32)), jnp.asarray(k_pages), jnp.asarray(v_pages),
        jnp.array([3], jnp.int32), jnp.array([[0]], jnp.int32), jnp.array([0, 1], jnp.int32),
        scale=1.0, window=2, softcap=2.0,
    )
    logits = 2.0 * np.tanh(np.array([1.0, 3.0]) / 2.0)  # q . k for keys 1 and 2
    weights = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(np.asarray(out)[0, 0], weights @ values[1:], rtol=1e-6)


def one_prefill_row(page_size, pages_per_row):
    return [(page_size * pages_per_row - 5, page_size * pages_per_row)]


@pytest.mark.parametrize("window, softcap, int8", [(0, None, False), (6, 30.0, False), (6, 30.0, True)])
@pytest.mark.parametrize(
    "rows, num_tokens",
    [(mixed_rows, 40), (decode_rows, 8), (one_prefill_row, 32)],
    ids=["mixed-tiles_of_5", "decodes-tiles_of_1", "one_prefill-one_tile"],
)
def test_reference_matches_the_engine_path(window, softcap, rows, num_tokens, int8):
    """The engine's path cuts the tokens into tiles of T / R (5, 1 and 32 here); the plain reference does not.
    With int8 pages the engine's path dequantizes what it gathers (NaN scales on unused slots)."""
    page_size, pages_per_row = 8, 4
    batch = make_batch(
        rows(page_size, pages_per_row), num_tokens=num_tokens, heads=4, kv_heads=2, head_dim=16,
        page_size=page_size, pages_per_row=pages_per_row, dtype=np.float32, int8=int8,
    )
    real = int(batch.query_start[-1])
    token_rows = np.repeat(np.arange(len(batch.kv_lens)), np.diff(batch.query_start)).astype(np.int32)
    q_lens = np.diff(batch.query_start)[token_rows]
    positions = batch.kv_lens[token_rows] - q_lens + (np.arange(real) - batch.query_start[token_rows])
    layer = LayerAttention(scale=0.25, window=window, softcap=softcap)
    q, k_pages, v_pages, kv_lens, page_table, query_start = batch.args()
    scales = batch.scales()
    engine = jax.jit(paged_attention_reference, static_argnums=7)(
        q, k_pages, v_pages, jnp.asarray(np.pad(positions, (0, len(q) - real)), jnp.int32), query_start, kv_lens, page_table, layer,
        scales.get("k_scales"), scales.get("v_scales"),
    )
    ours = REFERENCE(
        q, k_pages, v_pages, kv_lens, page_table, query_start, scale=0.25, window=window, softcap=softcap, **scales
    )
    assert_close(np.asarray(ours), np.asarray(engine))
    assert np.all(np.asarray(engine)[real:] == 0.0)


def test_the_engine_paths_write_and_attend_alike_with_int8_pages():
    """PagedAttention on an int8 pool: the XLA path (write_kv_int8 + the engine's reference) and the
    Pallas path (interpret mode) store the same codes and scales and give the same outputs."""
    page_size, pages_per_row = 8, 4
    batch = make_batch(
        mixed_rows(page_size, pages_per_row), num_tokens=40, heads=4, kv_heads=2, head_dim=16,
        page_size=page_size, pages_per_row=pages_per_row, dtype=np.float32, int8=True,
    )
    real = int(batch.query_start[-1])
    token_rows = np.repeat(np.arange(len(batch.kv_lens)), np.diff(batch.query_start)).astype(np.int32)
    q_lens = np.diff(batch.query_start)[token_rows]
    positions = batch.kv_lens[token_rows] - q_lens + (np.arange(real) - batch.query_start[token_rows])
    slots = batch.page_table[token_rows, positions // page_size] * page_size + positions % page_size
    pad = (0, len(batch.q) - real)  # padding tokens: row 0, position 0, the null page's slot 0
    rng = np.random.default_rng(1)
    new_k, new_v = (jnp.asarray(rng.normal(size=(len(batch.q), 2, 16)), jnp.float32) for _ in range(2))
    cache = {"k": batch.k_pages, "v": batch.v_pages, "k_scale": batch.k_scales, "v_scale": batch.v_scales}
    layer = LayerAttention(scale=0.25)

    def run(kernels):
        backend = PagedAttention(
            jnp.asarray(np.pad(slots, pad), jnp.int32),
            jnp.asarray(batch.page_table), jnp.asarray(batch.kv_lens), jnp.asarray(batch.query_start), kernels=kernels,
        )
        call = lambda q, k, v, p, c: backend(q, k, v, p, c, layer)  # noqa: E731
        args = (jnp.asarray(batch.q), new_k, new_v, jnp.asarray(np.pad(positions, pad), jnp.int32), jax.tree.map(jnp.asarray, cache))
        out, written = compile_once(call, *args)(*args)
        return np.asarray(out), jax.tree.map(lambda a: np.asarray(a)[1:], written)  # page 0: padding's undefined writes

    reference_out, reference_cache = run("reference")
    kernel_out, kernel_cache = run("interpret")
    assert_close(kernel_out[:real], reference_out[:real])
    for name in ("k", "v", "k_scale", "v_scale"):
        np.testing.assert_array_equal(kernel_cache[name], reference_cache[name], err_msg=name)
    assert not np.array_equal(reference_cache["k"], batch.k_pages[1:]), "nothing was written"


# ----------------------------------------------------------------------------- kernels against the reference


@dataclasses.dataclass(frozen=True)
class Config:
    dtype: type
    page_size: int
    heads: int
    kv_heads: int
    head_dim: int
    window: int = 0
    softcap: float | None = None
    int8: bool = False
    pages_per_row: int = 4


CONFIGS = {
    "f32-page8-mha-d64": Config(np.float32, 8, 2, 2, 64),
    "bf16-page16-gqa-d128": Config(jnp.bfloat16, 16, 4, 2, 128),
    "f32-page16-mqa-d64": Config(np.float32, 16, 4, 1, 64),
    "f32-page8-gqa-window-softcap": Config(np.float32, 8, 4, 2, 64, window=5, softcap=20.0),
    "bf16-page8-int8-group3": Config(jnp.bfloat16, 8, 6, 2, 64, int8=True),
    "f32-page16-int8-mqa-window": Config(np.float32, 16, 2, 1, 128, window=9, int8=True),
}
# Small blocks so that rows span several query blocks and several page chunks.
VARIANTS = {
    "tpu": functools.partial(kernel.ragged_paged_attention_tpu, block_q=8, pages_per_block=2),
    "gpu": functools.partial(kernel.ragged_paged_attention_gpu, block_q=16),
}


def compile_once(fn, *args, **kwargs):
    """fn(*args, **kwargs) compiled for these shapes (static options bound by the caller) -> the executable."""
    return jax.jit(fn).lower(*args, **kwargs).compile(FAST_COMPILE)


def programs(variant: str, config: Config, batch: Batch):
    """(kernel, reference) executables for one (variant, config), compiled for the shapes of batch."""
    options = dict(scale=config.head_dim**-0.5, window=config.window, softcap=config.softcap)
    fn = VARIANTS[variant]
    if variant == "gpu":
        fn = functools.partial(fn, pages_per_block=max(1, 16 // config.page_size))
    ours = compile_once(functools.partial(fn, **options, interpret=True), *batch.args(), **batch.scales())
    reference = functools.partial(ragged_paged_attention_reference, **options)
    reference = compile_once(reference, *batch.args(), **batch.scales())
    return ours, reference


def batches(config: Config):
    """Two batches of one shape (mixed rows, then decodes), 8 rows each and padding tokens at the end."""
    options = dict(
        num_tokens=48, heads=config.heads, kv_heads=config.kv_heads, head_dim=config.head_dim,
        page_size=config.page_size, pages_per_row=config.pages_per_row, dtype=config.dtype, int8=config.int8,
    )
    for seed, rows in enumerate((mixed_rows, decode_rows)):
        yield make_batch(rows(config.page_size, config.pages_per_row), seed=seed, **options)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", CONFIGS)
def test_kernel_matches_reference(variant, name):
    config = CONFIGS[name]
    all_batches = list(batches(config))  # one shape: both batches run the same executables
    ours, reference = programs(variant, config, all_batches[0])
    for batch in all_batches:
        expected = reference(*batch.args(), **batch.scales())
        out = ours(*batch.args(), **batch.scales())
        assert out.dtype == batch.q.dtype
        out, expected = np.asarray(out.astype(jnp.float32)), np.asarray(expected.astype(jnp.float32))
        assert_close(out, expected, dtype=config.dtype)
        assert np.all(out[batch.query_start[-1] :] == 0.0), "padding tokens must give exactly 0"


def test_public_entry_runs_the_tpu_style_kernel_interpreted_on_cpu():
    batch = make_batch(
        mixed_rows(32, 2), num_tokens=64, heads=2, kv_heads=1, head_dim=64, page_size=32, pages_per_row=2,
        dtype=np.float32,
    )
    entry = functools.partial(kernel.ragged_paged_attention, scale=0.125, interpret=True)
    out = compile_once(entry, *batch.args())(*batch.args())
    assert_close(np.asarray(out), np.asarray(REFERENCE(*batch.args(), scale=0.125)))


# ----------------------------------------------------------------------------- query block plan


PLAN = jax.jit(kernel.plan_query_blocks, static_argnums=(1, 2))


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(q_lens=st.lists(st.integers(0, 20), min_size=4, max_size=4))
def test_every_token_lands_in_one_block_of_its_own_row(q_lens):
    num_tokens, block_q = 80, 8  # one shape for every example: the plan compiles once
    query_start = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    plan = jax.tree.map(np.asarray, PLAN(jnp.asarray(query_start), num_tokens, block_q))
    real = np.arange(num_tokens) < query_start[-1]
    np.testing.assert_array_equal(plan.real, real)
    slots = plan.slot[real]
    assert len(set(slots.tolist())) == len(slots), "two tokens share a block slot"
    np.testing.assert_array_equal(plan.source[slots], np.arange(num_tokens)[real])
    token_rows = np.repeat(np.arange(4), q_lens)
    np.testing.assert_array_equal(plan.row[slots // block_q], token_rows)
    index_in_row = np.arange(real.sum()) - query_start[token_rows]
    np.testing.assert_array_equal(plan.first_query[slots // block_q] + slots % block_q, index_in_row)


# ----------------------------------------------------------------------------- KV page write


@pytest.mark.parametrize("implementation", ["tpu", "gpu"])
@pytest.mark.parametrize("dtype, int8", [(np.float32, False), (jnp.bfloat16, True)])
def test_write_kv_pages_matches_reference(implementation, dtype, int8):
    rng = np.random.default_rng(3)
    num_pages, page_size, kv_heads, head_dim, num_tokens = 5, 8, 2, 64, 12
    shape = (num_pages, page_size, kv_heads, head_dim)
    pool = rng.integers(-127, 128, shape).astype(np.int8) if int8 else rng.normal(size=shape).astype(dtype)
    new_k, new_v = (jnp.asarray(rng.normal(size=(num_tokens, kv_heads, head_dim)), dtype) for _ in range(2))
    # 9 real tokens at shuffled slots off the null page, 3 padding tokens into the null page.
    slots = np.concatenate([rng.permutation(np.arange(page_size, num_pages * page_size))[:9], [0, 0, 1]])
    scales = {}
    if int8:
        scales = {k: jnp.asarray(rng.uniform(0.01, 0.02, shape[:3]), jnp.float32) for k in ("k_scales", "v_scales")}
    args = (jnp.asarray(pool), jnp.asarray(-pool), new_k, new_v, jnp.asarray(slots, jnp.int32))
    out = kernel.write_kv_pages(*args, **scales, implementation=implementation, interpret=True)
    expected = write_kv_pages_reference(*args, **scales)
    assert len(out) == len(expected) == (4 if int8 else 2)
    for got, want in zip(out, expected):
        got, want = np.asarray(got.astype(jnp.float32))[1:], np.asarray(want.astype(jnp.float32))[1:]
        if got.dtype == want.dtype and int8 and got.ndim == 4:
            assert np.max(np.abs(got - want)) <= 1, "int8 values differ by more than one rounding step"
        else:
            assert_close(got, want, atol=0.0)


# ----------------------------------------------------------------------------- validation and dispatch


def _shapes(**changes):
    """Valid abstract inputs (and options) with some replaced."""
    s = jax.ShapeDtypeStruct
    base = dict(
        q=s((16, 4, 64), jnp.float32), k_pages=s((9, 8, 2, 64), jnp.float32), v_pages=s((9, 8, 2, 64), jnp.float32),
        kv_lens=s((3,), jnp.int32), page_table=s((3, 4), jnp.int32), query_start=s((4,), jnp.int32),
        k_scales=None, v_scales=None, window=0, softcap=None,
    )
    return base | changes


S = jax.ShapeDtypeStruct
BAD_INPUTS = {
    "heads": (_shapes(q=S((16, 3, 64), jnp.float32)), r"H=3 is not a multiple of KV heads K=2"),
    "head_dim": (_shapes(q=S((16, 4, 32), jnp.float32)), r"head_dim 64 != q head_dim 32"),
    "page_table_rank": (_shapes(page_table=S((12,), jnp.int32)), r"page_table must be \[R, P\], got shape \(12,\)"),
    "query_start_len": (_shapes(query_start=S((3,), jnp.int32)), r"query_start shape \(3,\) != \(R \+ 1,\) = \(4,\)"),
    "kv_lens_len": (_shapes(kv_lens=S((4,), jnp.int32)), r"kv_lens shape \(4,\) != \(R,\) = \(3,\)"),
    "int64_lens": (_shapes(kv_lens=S((3,), jnp.int64)), r"kv_lens must be int32, got int64"),
    "page_dtype": (_shapes(k_pages=S((9, 8, 2, 64), jnp.bfloat16), v_pages=S((9, 8, 2, 64), jnp.bfloat16)),
                   r"k_pages dtype bfloat16 != q dtype float32"),
    "int8_without_scales": (_shapes(k_pages=S((9, 8, 2, 64), jnp.int8), v_pages=S((9, 8, 2, 64), jnp.int8)),
                            r"scales must be given iff the pages are int8; pages are int8"),
    "scales_without_int8": (_shapes(k_scales=S((9, 8, 2), jnp.float32), v_scales=S((9, 8, 2), jnp.float32)),
                            r"pages are float32, scales given: True"),
    "scale_shape": (_shapes(k_pages=S((9, 8, 2, 64), jnp.int8), v_pages=S((9, 8, 2, 64), jnp.int8),
                            k_scales=S((9, 8), jnp.float32), v_scales=S((9, 8, 2), jnp.float32)),
                    r"k_scales must be float32 \(9, 8, 2\), got float32 \(9, 8\)"),
    "q_dtype": (_shapes(q=S((16, 4, 64), jnp.float16)), r"q dtype must be float32 or bfloat16, got float16"),
    "window": (_shapes(window=-1), r"window must be >= 0, got -1"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_inputs_are_rejected_naming_the_value(name):
    inputs, message = BAD_INPUTS[name]
    with pytest.raises(ValueError, match=message):
        kernel.check_attention_inputs(**inputs)


def test_valid_inputs_pass_validation():
    kernel.check_attention_inputs(**_shapes())


def test_write_rejects_mismatched_new_values():
    pages = jnp.zeros((4, 8, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match=r"new_k, new_v must be \[T, K, D\] = \[T, \*\(2, 64\)\], got \(3, 1, 64\)"):
        kernel.write_kv_pages(pages, pages, jnp.zeros((3, 1, 64)), jnp.zeros((3, 1, 64)), jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match=r"slots must be int32 \[T\] = \[3\], got int32 \(4,\)"):
        kernel.write_kv_pages(pages, pages, jnp.zeros((3, 2, 64)), jnp.zeros((3, 2, 64)), jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match=r"new_k dtype bfloat16 != pages dtype float32"):
        new = jnp.zeros((3, 2, 64), jnp.bfloat16)
        kernel.write_kv_pages(pages, pages, new, new, jnp.zeros(3, jnp.int32))


def tiny_batch():
    return make_batch(
        [(1, 3)], num_tokens=8, heads=2, kv_heads=1, head_dim=64, page_size=8, pages_per_row=1, dtype=np.float32
    )


def test_cpu_without_interpret_points_to_the_reference():
    batch = tiny_batch()
    with pytest.raises(ValueError, match="backend 'cpu'.*reference"):
        kernel.ragged_paged_attention(*batch.args(), scale=1.0)
    with pytest.raises(ValueError, match="implementation must be None, 'tpu' or 'gpu', got 'cuda'"):
        kernel.ragged_paged_attention(*batch.args(), scale=1.0, implementation="cuda")


def test_triton_variant_rejects_blocks_triton_cannot_tile():
    batch = tiny_batch()
    with pytest.raises(ValueError, match="block_q a power of two >= 16, got 12"):
        kernel.ragged_paged_attention_gpu(*batch.args(), scale=1.0, block_q=12)


# ----------------------------------------------------------------------------- lowering at Llama-3-8B shapes


def llama3_8b_inputs(dtype, page_size, int8=False):
    """Abstract inputs: H=32, K=8, D=128; 64 rows of up to 2048 tokens; a ragged batch of 512 tokens."""
    num_rows, context, num_tokens = 64, 2048, 512
    pages_per_row = context // page_size
    num_pages = num_rows * pages_per_row + 1
    page_dtype = jnp.int8 if int8 else dtype
    pages = S((num_pages, page_size, 8, 128), page_dtype)
    inputs = [S((num_tokens, 32, 128), dtype), pages, pages, S((num_rows,), jnp.int32),
              S((num_rows, pages_per_row), jnp.int32), S((num_rows + 1,), jnp.int32)]
    scales = [S((num_pages, page_size, 8), jnp.float32)] * 2 if int8 else []
    return inputs, scales


LOWERINGS = [(jnp.bfloat16, 16, False), (jnp.float32, 32, False), (jnp.bfloat16, 32, True)]


def _export(fn, platform, inputs):
    checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON_TARGET)] if platform == "cuda" else []
    return jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*inputs)


@pytest.mark.parametrize(
    "implementation, platform, target", [("tpu", "tpu", "tpu_custom_call"), ("gpu", "cuda", TRITON_TARGET)]
)
@pytest.mark.parametrize("dtype, page_size, int8", LOWERINGS)
def test_attention_lowers_at_llama3_8b_shapes(implementation, platform, target, dtype, page_size, int8):
    inputs, scales = llama3_8b_inputs(dtype, page_size, int8)

    def attend(*arrays):
        extra = dict(zip(("k_scales", "v_scales"), arrays[6:]))
        return kernel.ragged_paged_attention(
            *arrays[:6], scale=128**-0.5, window=0, softcap=None, implementation=implementation, **extra
        )

    exported = _export(attend, platform, inputs + scales)
    assert target in exported.mlir_module()
    assert exported.out_avals[0].shape == (512, 32, 128) and exported.out_avals[0].dtype == dtype


@pytest.mark.parametrize("implementation, platform", [("tpu", "tpu"), ("gpu", "cuda")])
@pytest.mark.parametrize("int8", [False, True])
def test_write_lowers_at_llama3_8b_shapes(implementation, platform, int8):
    inputs, scales = llama3_8b_inputs(jnp.bfloat16, 16, int8)
    new = S((512, 8, 128), jnp.bfloat16)

    def write(k_pages, v_pages, new_k, new_v, slots, *scale_arrays):
        extra = dict(zip(("k_scales", "v_scales"), scale_arrays))
        return kernel.write_kv_pages(k_pages, v_pages, new_k, new_v, slots, implementation=implementation, **extra)

    exported = _export(write, platform, [inputs[1], inputs[2], new, new, S((512,), jnp.int32)] + scales)
    assert [a.shape for a in exported.out_avals] == [a.shape for a in inputs[1:3] + scales]
