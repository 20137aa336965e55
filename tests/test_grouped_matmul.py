"""grouped_matmul: reference by hand, the work list, kernels vs `jax.lax.ragged_dot`, lowering.
The transposed-rhs option ([E, N, K] weights) is checked the same ways.

Rows past the groups are filled with NaN in the inputs, so a kernel that reads them into a
result (instead of writing 0) fails. The TPU-style and GPU-style kernels run in Pallas's
interpreter; one compiled shape serves many group-size patterns (group sizes are data).
Both variants are lowered for their real platforms (TPU, CUDA) at Mixtral-8x7B shapes and at a
small shape off the 128 grid, from abstract shapes only.
"""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import grouped_matmul as gm
from pallas_kernels.grouped_matmul import kernel as gm_kernel
from pallas_kernels.testing import assert_close, random_normal

BF16 = ml_dtypes.bfloat16
IMPLEMENTATIONS = ["tpu", "gpu"]
TRITON_TARGETS = ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi")

# ---- the reference, by hand ----------------------------------------------------------------------

HAND_LHS = np.array([[1.0, 1.0], [2.0, 3.0], [5.0, 7.0], [9.0, 9.0]], np.float32)
HAND_SIZES = np.array([1, 0, 2], np.int32)  # row 0: group 0; rows 1-2: group 2; row 3: padding


def test_reference_by_hand():
    rhs = np.array([[[1, 2], [3, 4]], [[100, 100], [100, 100]], [[0, 1], [1, 0]]], np.float32)
    out = gm.grouped_matmul_reference(jnp.asarray(HAND_LHS), jnp.asarray(rhs), jnp.asarray(HAND_SIZES))
    # row 0 = [1, 1] @ [[1, 2], [3, 4]]; rows 1-2 swap their columns; row 3 is padding.
    expected = np.array([[4.0, 6.0], [3.0, 2.0], [7.0, 5.0], [0.0, 0.0]], np.float32)
    np.testing.assert_array_equal(out, expected)


def test_int8_reference_by_hand():
    rhs = np.array([[[1, 0], [0, 1]], [[9, 9], [9, 9]], [[0, 2], [2, 0]]], np.int8)
    scales = np.array([[2.0, 3.0], [1.0, 1.0], [0.5, 0.25]], np.float32)
    out = gm.grouped_matmul_reference(
        jnp.asarray(HAND_LHS), jnp.asarray(rhs), jnp.asarray(HAND_SIZES), jnp.asarray(scales)
    )
    # group 0: diag(2, 3); group 2: [[0, 0.5], [1, 0]] (column 0 scaled by 0.5, column 1 by 0.25)
    expected = np.array([[2.0, 3.0], [3.0, 1.0], [7.0, 2.5], [0.0, 0.0]], np.float32)
    np.testing.assert_array_equal(out, expected)


# ---- the work list -------------------------------------------------------------------------------

make_segments = jax.jit(gm.make_segments, static_argnums=(1, 2))
FOUR_GROUPS = st.lists(st.integers(0, 40), min_size=4, max_size=4)
ONE_GROUP = st.lists(st.integers(0, 120), min_size=1, max_size=1)


@settings(max_examples=40, deadline=None)
@given(sizes=st.one_of(FOUR_GROUPS, ONE_GROUP), rows_and_tile=st.sampled_from([(9, 8), (100, 16)]))
def test_segments_cover_each_row_once_with_its_group(sizes, rows_and_tile):
    num_rows, tile_rows = rows_and_tile
    num_groups = len(sizes)
    # Clip the sizes so they sum to at most num_rows.
    ends = np.minimum(np.cumsum(sizes), num_rows)
    sizes = np.diff(ends, prepend=0).astype(np.int32)
    num_tiles = -(-num_rows // tile_rows)
    expected_group = np.full(num_tiles * tile_rows, num_groups)
    expected_group[: ends[-1]] = np.repeat(np.arange(num_groups), sizes)

    work = make_segments(jnp.asarray(sizes), num_rows, tile_rows)
    tiles, groups, starts, ends = (np.asarray(a) for a in work)
    assert len(tiles) == num_tiles + num_groups
    used = ends > starts
    covered = np.zeros(num_tiles * tile_rows, int)
    for tile, group, start, end in zip(tiles[used], groups[used], starts[used], ends[used]):
        assert tile * tile_rows <= start < end <= (tile + 1) * tile_rows
        assert np.all(expected_group[start:end] == group)
        covered[start:end] += 1
    np.testing.assert_array_equal(covered, 1)
    assert np.all(np.diff(tiles) >= 0), "a tile's segments must be consecutive"
    assert np.all(np.diff(starts[used]) > 0), "segments must be in row order"
    assert np.all(groups[~used] == num_groups), "unused entries must have nothing to do"
    assert np.all(used[: np.sum(used)]), "unused entries only at the end"


# ---- kernels vs reference (interpreted) ----------------------------------------------------------


def _inputs(m, k, n, num_groups, dtype, int8, seed=0):
    lhs = random_normal(seed, (m, k), dtype)
    if int8:
        rng = np.random.default_rng(seed + 1)
        rhs = rng.integers(-127, 128, size=(num_groups, k, n)).astype(np.int8)
        scales = rng.uniform(0.5, 2.0, size=(num_groups, n)).astype(np.float32) / 127
        return lhs, rhs, scales
    return lhs, random_normal(seed + 1, (num_groups, k, n), dtype), None


reference = jax.jit(gm.grouped_matmul_reference)


def _check(impl, lhs, rhs, sizes, scales, dtype, transpose_rhs=False):
    """rhs: [E, K, N]; with transpose_rhs the kernel gets it as [E, N, K], the reference as it is."""
    total = int(np.sum(sizes))
    lhs = np.array(lhs)
    lhs[total:] = np.nan  # padding rows: any read into a result shows up
    args = (jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes, jnp.int32))
    kernel_rhs = jnp.asarray(np.ascontiguousarray(np.swapaxes(rhs, 1, 2))) if transpose_rhs else args[1]
    scales = None if scales is None else jnp.asarray(scales)
    out = gm.grouped_matmul(
        args[0], kernel_rhs, args[2], rhs_scales=scales, transpose_rhs=transpose_rhs, interpret=True, implementation=impl
    )
    assert out.dtype == lhs.dtype
    assert_close(out, reference(*args, scales), dtype)
    assert np.all(np.asarray(out[total:], np.float32) == 0), "padding rows must be 0"


# 200 rows: two TPU row tiles (128), four GPU row tiles (64).
SIZE_PATTERNS = {
    "mixed": [50, 0, 90, 60],
    "all_in_first": [200, 0, 0, 0],
    "all_in_last": [0, 0, 0, 200],
    "all_empty": [0, 0, 0, 0],
    "sum_below_m": [5, 3, 0, 120],
    "one_row_each": [1, 1, 1, 1],
    "tile_aligned": [64, 64, 0, 72],
}


@pytest.mark.parametrize("pattern", SIZE_PATTERNS)
@pytest.mark.parametrize("dtype,int8", [(np.float32, False), (BF16, True)], ids=["f32", "bf16-int8"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_group_patterns(impl, dtype, int8, pattern):
    lhs, rhs, scales = _inputs(200, 128, 128, 4, dtype, int8)
    _check(impl, lhs, rhs, SIZE_PATTERNS[pattern], scales, dtype)


@pytest.mark.parametrize(
    "m,k,n,sizes,dtype,int8",
    [
        (1, 128, 256, [0, 1], np.float32, True),  # one decode row
        (300, 256, 128, [100, 0, 150, 20, 0], np.float32, True),  # several tiles, the last partial
        (64, 1024, 1024, [20, 44, 0], BF16, False),  # several K and N blocks
        (39, 96, 48, [10, 25, 0], BF16, True),  # odd rows; K, N not multiples of 128
    ],
)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_shapes(impl, m, k, n, sizes, dtype, int8):
    lhs, rhs, scales = _inputs(m, k, n, len(sizes), dtype, int8)
    _check(impl, lhs, rhs, sizes, scales, dtype)


@pytest.mark.parametrize(
    "m,k,n,sizes,dtype,int8",
    [
        (200, 128, 256, SIZE_PATTERNS["mixed"], np.float32, False),  # K != N: a swapped block shape fails
        (39, 96, 48, [10, 25, 0], BF16, True),  # K, N not multiples of 128; per-output-channel scales
    ],
)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_transposed_rhs(impl, m, k, n, sizes, dtype, int8):
    lhs, rhs, scales = _inputs(m, k, n, len(sizes), dtype, int8)
    _check(impl, lhs, rhs, sizes, scales, dtype, transpose_rhs=True)


# ---- implementation choice and bad input ---------------------------------------------------------


@pytest.mark.parametrize("k,n,match", [(40, 128, "K = 40"), (128, 40, "N = 40")])
def test_gpu_variant_needs_multiples_of_16(k, n, match):
    args = (jnp.zeros((8, k)), jnp.zeros((2, k, n)), jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match=match):
        gm.grouped_matmul(*args, interpret=True, implementation="gpu")


def test_default_implementation_by_backend(monkeypatch):
    assert gm_kernel.pick_implementation(None, interpret=True) == "tpu"  # CPU, interpreted
    with pytest.raises(ValueError, match="backend 'cpu'"):
        gm_kernel.pick_implementation(None, interpret=False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert gm_kernel.pick_implementation(None, interpret=False) == "gpu"
    with pytest.raises(ValueError, match="'triton'"):
        gm_kernel.pick_implementation("triton", interpret=False)


LHS = jnp.zeros((8, 128), jnp.float32)
RHS = jnp.zeros((3, 128, 128), jnp.float32)
RHS_INT8 = jnp.zeros((3, 128, 128), jnp.int8)
SIZES = jnp.zeros((3,), jnp.int32)


@pytest.mark.parametrize(
    "lhs,rhs,sizes,scales,match",
    [
        (LHS, RHS, jnp.zeros((4,), jnp.int32), None, r"group_sizes must be \[E\] = \[3\], got shape \(4,\)"),
        (LHS, RHS, jnp.zeros((3,), jnp.int16), None, "int16"),
        (LHS, RHS.astype(jnp.bfloat16), SIZES, None, "rhs dtype bfloat16 does not match lhs dtype float32"),
        (LHS.astype(jnp.int32), RHS, SIZES, None, "lhs dtype int32"),
        (LHS, RHS_INT8, SIZES, None, "needs rhs_scales"),
        (LHS, RHS_INT8, SIZES, jnp.ones((3, 64), jnp.float32), r"\(3, 64\)"),
        (LHS, RHS, SIZES, jnp.ones((3, 128), jnp.float32), "only for int8"),
        (LHS, jnp.zeros((3, 64, 128)), SIZES, None, "K = 64"),
        (LHS, jnp.zeros((128, 128)), SIZES, None, r"\(128, 128\)"),
        (jnp.zeros((8,)), RHS, SIZES, None, r"\(8,\)"),
    ],
)
def test_bad_input_raises(lhs, rhs, sizes, scales, match):
    with pytest.raises(ValueError, match=match):
        gm.grouped_matmul(lhs, rhs, sizes, rhs_scales=scales, interpret=True)


@pytest.mark.parametrize(
    "rhs,scales,match",
    [
        (jnp.zeros((3, 128, 64)), None, "K = 64"),  # [E, N, K]: K is the last axis
        (jnp.zeros((3, 64, 128), jnp.int8), jnp.ones((3, 128), jnp.float32), r"\[3, 64\]"),  # scales are [E, N]
        (jnp.zeros((128, 128)), None, r"\[E, N, K\] \(transpose_rhs\)"),
    ],
)
def test_bad_transposed_rhs_raises(rhs, scales, match):
    with pytest.raises(ValueError, match=match):
        gm.grouped_matmul(LHS, rhs, SIZES, rhs_scales=scales, transpose_rhs=True, interpret=True)


# ---- lowering for TPU and CUDA -------------------------------------------------------------------

S = jax.ShapeDtypeStruct
EXPERTS, HIDDEN, INTERMEDIATE = 8, 4096, 14336
TOKENS = 512 * 2  # 512 tokens, each routed to 2 experts
MIXTRAL = {
    "up_bf16": (S((TOKENS, HIDDEN), jnp.bfloat16), S((EXPERTS, HIDDEN, INTERMEDIATE), jnp.bfloat16), None),
    "up_f32": (S((TOKENS, HIDDEN), jnp.float32), S((EXPERTS, HIDDEN, INTERMEDIATE), jnp.float32), None),
    "down_int8": (
        S((TOKENS, INTERMEDIATE), jnp.bfloat16),
        S((EXPERTS, INTERMEDIATE, HIDDEN), jnp.int8),
        S((EXPERTS, HIDDEN), jnp.float32),
    ),
    "decode_up_bf16": (S((2, HIDDEN), jnp.bfloat16), S((EXPERTS, HIDDEN, INTERMEDIATE), jnp.bfloat16), None),
    "small_k96_n48": (S((40, 96), jnp.float32), S((EXPERTS, 96, 48), jnp.float32), None),
}


def _export(impl: str, lhs: S, rhs: S, scales: S | None, transpose_rhs: bool = False) -> jax.export.Exported:
    platform = {"tpu": "tpu", "gpu": "cuda"}[impl]
    disabled = [jax.export.DisabledSafetyCheck.custom_call(t) for t in TRITON_TARGETS]
    fn = jax.jit(functools.partial(gm.grouped_matmul, implementation=impl, transpose_rhs=transpose_rhs))
    sizes = S((EXPERTS,), jnp.int32)
    return jax.export.export(fn, platforms=[platform], disabled_checks=disabled)(
        lhs, rhs, sizes, rhs_scales=scales
    )


@pytest.mark.parametrize("name", MIXTRAL)
def test_tpu_variant_lowers_for_tpu(name):
    lhs, rhs, scales = MIXTRAL[name]
    exported = _export("tpu", lhs, rhs, scales)
    assert exported.out_avals[0].shape == (lhs.shape[0], rhs.shape[2])
    assert exported.out_avals[0].dtype == lhs.dtype
    assert "tpu_custom_call" in exported.mlir_module()


@pytest.mark.parametrize("name", MIXTRAL)
def test_gpu_variant_lowers_for_cuda(name):
    lhs, rhs, scales = MIXTRAL[name]
    exported = _export("gpu", lhs, rhs, scales)
    assert exported.out_avals[0].shape == (lhs.shape[0], rhs.shape[2])
    assert exported.out_avals[0].dtype == lhs.dtype
    assert any(target in exported.mlir_module() for target in TRITON_TARGETS)


@pytest.mark.parametrize("name", ["up_bf16", "down_int8", "small_k96_n48"])
@pytest.mark.parametrize("impl,target", [("tpu", ("tpu_custom_call",)), ("gpu", TRITON_TARGETS)])
def test_transposed_rhs_lowers(impl, target, name):
    lhs, rhs, scales = MIXTRAL[name]
    transposed = S((rhs.shape[0], rhs.shape[2], rhs.shape[1]), rhs.dtype)  # [E, N, K], HF's layout
    exported = _export(impl, lhs, transposed, scales, transpose_rhs=True)
    assert exported.out_avals[0].shape == (lhs.shape[0], rhs.shape[2])
    assert any(t in exported.mlir_module() for t in target)
