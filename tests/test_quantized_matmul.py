"""quantized_matmul: layout and reference by hand, quantize round trips, kernels vs reference.

The reference is checked against tiny cases written out by hand (packed bytes included); the
TPU-style and GPU-style kernels run in Pallas's interpreter against the reference over sweeps
of group sizes, int4 modes, dtypes and shapes (small, since interpreting is slow); both variants
are lowered for their real platforms (TPU, CUDA) at Llama-3-8B MLP shapes and at small shapes off
the 128 grid, from abstract shapes only.
"""

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import quantized_matmul as qm
from pallas_kernels.quantized_matmul import kernel as qm_kernel
from pallas_kernels.testing import assert_close, random_normal

BF16 = ml_dtypes.bfloat16
IMPLEMENTATIONS = ["tpu", "gpu"]
TRITON_TARGETS = ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi")

# ---- the reference and the layout, by hand -------------------------------------------------------

# Two output rows, K = 4, groups of 2 columns. Nibbles q, row by row: [1, 2, 3, 4] and
# [15, 0, 8, 9]. Half-split packing: byte j = q[j] | q[j + 2] << 4.
HAND_PACKED = np.array([[0x31, 0x42], [0x8F, 0x90]], np.uint8)  # [49, 66], [143, 144]
HAND_SCALES = np.array([[0.5, 2.0], [1.0, 0.25]], np.float32)
HAND_MINS = np.array([[-1.0, 0.5], [2.0, -3.0]], np.float32)
HAND_X = np.array([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], np.float32)


def test_int4_symmetric_by_hand():
    weights = qm.Int4Weights(jnp.asarray(HAND_PACKED), jnp.asarray(HAND_SCALES))
    # (q - 8) * scale: row 0 = (-7, -6) * 0.5, (-5, -4) * 2; row 1 = (7, -8) * 1, (0, 1) * 0.25
    expected_w = np.array([[-3.5, -3.0, -10.0, -8.0], [7.0, -8.0, 0.0, 0.25]], np.float32)
    np.testing.assert_array_equal(qm.dequantize(weights), expected_w)
    # x row 0 picks column 0; x row 1 sums each weight row.
    expected = np.array([[-3.5, 7.0], [-24.5, -0.75]], np.float32)
    np.testing.assert_allclose(qm.quantized_matmul_reference(jnp.asarray(HAND_X), weights), expected)


def test_int4_asymmetric_by_hand():
    weights = qm.Int4Weights(jnp.asarray(HAND_PACKED), jnp.asarray(HAND_SCALES), jnp.asarray(HAND_MINS))
    # q * scale + min: row 0 = (1, 2) * 0.5 - 1, (3, 4) * 2 + 0.5; row 1 = (15, 0) + 2, (8, 9) * 0.25 - 3
    expected_w = np.array([[-0.5, 0.0, 6.5, 8.5], [17.0, 2.0, -1.0, -0.75]], np.float32)
    np.testing.assert_array_equal(qm.dequantize(weights), expected_w)
    expected = np.array([[-0.5, 17.0], [14.5, 17.25]], np.float32)
    np.testing.assert_allclose(qm.quantized_matmul_reference(jnp.asarray(HAND_X), weights), expected)


def test_int4_shape_and_group_size_by_hand():
    weights = qm.Int4Weights(jnp.asarray(HAND_PACKED), jnp.asarray(HAND_SCALES))
    assert weights.shape == (2, 4) and weights.group_size == 2 and weights.symmetric


def test_int8_by_hand():
    values = np.array([[1, -2, 3, -4], [127, 0, -127, 5]], np.int8)
    scales = np.array([[0.5, 0.25], [0.01, 2.0]], np.float32)
    weights = qm.Int8Weights(jnp.asarray(values), jnp.asarray(scales))
    assert weights.shape == (2, 4) and weights.group_size == 2
    # w = values * scale of the column's group
    expected_w = np.array([[0.5, -1.0, 0.75, -1.0], [1.27, 0.0, -254.0, 10.0]], np.float32)
    np.testing.assert_allclose(qm.dequantize(weights), expected_w, rtol=1e-6)
    x = np.array([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, -1.0]], np.float32)
    # row 0: sums of w rows; row 1: 2 * w[:, 0] - w[:, 3]
    expected = np.array([[-0.75, -242.73], [2.0, -7.46]], np.float32)
    np.testing.assert_allclose(qm.quantized_matmul_reference(jnp.asarray(x), weights), expected, rtol=1e-6)


def test_int8_per_channel_by_hand():
    values = np.array([[1, -2, 3, -4], [100, 0, -100, 5]], np.int8)
    weights = qm.Int8Weights(jnp.asarray(values), jnp.asarray([[0.5], [0.01]], jnp.float32))
    assert weights.group_size == 4
    expected_w = np.array([[0.5, -1.0, 1.5, -2.0], [1.0, 0.0, -1.0, 0.05]], np.float32)
    np.testing.assert_allclose(qm.dequantize(weights), expected_w, rtol=1e-6)


def test_pack_int4_by_hand():
    q = jnp.asarray([[1, 2, 3, 4], [15, 0, 8, 9]], jnp.uint8)
    np.testing.assert_array_equal(qm.pack_int4(q), HAND_PACKED)
    np.testing.assert_array_equal(qm.unpack_int4(jnp.asarray(HAND_PACKED)), q)


def test_weights_are_pytrees():
    weights = qm.Int4Weights(np.zeros((4, 32), np.uint8), np.ones((4, 2)), np.zeros((4, 2)))
    assert [leaf.shape for leaf in jax.tree.leaves(weights)] == [(4, 32), (4, 2), (4, 2)]
    rebuilt = jax.tree.map(lambda a: a + 1, weights)
    assert isinstance(rebuilt, qm.Int4Weights) and not rebuilt.symmetric
    np.testing.assert_array_equal(rebuilt.mins, 1)
    assert len(jax.tree.leaves(qm.Int4Weights(np.zeros((4, 32), np.uint8), np.ones((4, 2))))) == 2
    int8 = qm.Int8Weights(np.zeros((4, 64), np.int8), np.ones((4, 1)))
    assert len(jax.tree.leaves(int8)) == 2 and jax.tree.map(lambda a: a, int8).group_size == 64


# ---- quantize / dequantize round trips -----------------------------------------------------------

@st.composite
def weight_matrices(draw):
    elements = st.floats(-100.0, 100.0, width=32, allow_subnormal=False)
    w = draw(hnp.arrays(np.float32, (3, 128), elements=elements))
    group_size = draw(st.sampled_from([32, 64]))
    return w, group_size


# Compiled once per shape and group size, so hypothesis's examples run fast.
jit_quantize_int8 = jax.jit(qm.quantize_int8, static_argnums=1)
jit_quantize_int4 = jax.jit(qm.quantize_int4, static_argnums=(1, 2))
jit_dequantize = jax.jit(qm.dequantize)


def _step(per_group: jax.Array, group_size: int) -> np.ndarray:  # [N, K // G] -> [N, K]
    return np.repeat(np.asarray(per_group), group_size, axis=1)


def _assert_within_half_step(w: np.ndarray, restored: jax.Array, step: np.ndarray) -> None:
    error = np.abs(np.asarray(restored) - w)
    slack = 1e-6 * max(1.0, float(np.max(np.abs(w))))
    assert np.all(error <= 0.5 * step + slack), f"max error {error.max()} vs step {step.max()}"


@settings(max_examples=25, deadline=None)
@given(weight_matrices(), st.booleans())
def test_int8_round_trip_within_half_a_step(case, per_channel):
    w, group_size = case
    group_size = w.shape[1] if per_channel else group_size
    weights = jit_quantize_int8(jnp.asarray(w), group_size)
    assert weights.values.dtype == jnp.int8 and weights.group_size == group_size
    assert np.all(np.abs(np.asarray(weights.values, np.int32)) <= 127)
    _assert_within_half_step(w, jit_dequantize(weights), _step(weights.scales, group_size))


@settings(max_examples=25, deadline=None)
@given(weight_matrices(), st.booleans())
def test_int4_round_trip_within_half_a_step(case, symmetric):
    w, group_size = case
    weights = jit_quantize_int4(jnp.asarray(w), group_size, symmetric)
    assert weights.packed.shape == (w.shape[0], w.shape[1] // 2) and weights.packed.dtype == jnp.uint8
    assert weights.symmetric == symmetric and weights.group_size == group_size
    _assert_within_half_step(w, jit_dequantize(weights), _step(weights.scales, group_size))


@settings(max_examples=25, deadline=None)
@given(hnp.arrays(np.uint8, st.sampled_from([(1, 2), (3, 64)]), elements=st.integers(0, 15)))
def test_int4_pack_unpack_round_trip(q):
    packed = qm.pack_int4(jnp.asarray(q))
    assert packed.shape == (q.shape[0], q.shape[1] // 2)
    np.testing.assert_array_equal(packed & 0xF, q[:, : q.shape[1] // 2])
    np.testing.assert_array_equal(qm.unpack_int4(packed), q)


def test_constant_group_round_trips_exactly():
    w = jnp.concatenate([jnp.zeros((3, 64)), jnp.full((3, 64), 3.5)], axis=1)
    for weights in [jit_quantize_int8(w, 32), jit_quantize_int4(w, 32, False)]:
        np.testing.assert_array_equal(jit_dequantize(weights), w)


# ---- kernels vs reference (interpreted) ----------------------------------------------------------

reference = jax.jit(qm.quantized_matmul_reference)


def _weights(kind: str, n: int, k: int, group_size: int | None, seed: int = 1):
    """Random quantized weights: every int8 value / nibble, scales and mins of both signs."""
    rng = np.random.default_rng(seed)
    groups = 1 if group_size is None else k // group_size
    scales = jnp.asarray(rng.uniform(-0.02, 0.02, (n, groups)), jnp.float32)
    if kind == "int8":
        return qm.Int8Weights(jnp.asarray(rng.integers(-127, 128, (n, k)), jnp.int8), scales)
    packed = jnp.asarray(rng.integers(0, 256, (n, k // 2)), jnp.uint8)
    mins = None if kind == "int4" else jnp.asarray(rng.uniform(-0.1, 0.1, (n, groups)), jnp.float32)
    return qm.Int4Weights(packed, scales, mins)


def _check_kernel(impl: str, m: int, k: int, n: int, kind: str, group_size, dtype) -> None:
    x = jnp.asarray(random_normal(0, (m, k), dtype))
    weights = _weights(kind, n, k, group_size)
    out = qm.quantized_matmul(x, weights, interpret=True, implementation=impl)
    assert out.dtype == x.dtype
    assert_close(out, reference(x, weights), dtype)


@pytest.mark.parametrize(
    "group_size,dtype",
    [(32, np.float32), (128, np.float32), (None, np.float32), (32, BF16), (None, BF16)],
    ids=["g32-f32", "g128-f32", "per_channel-f32", "g32-bf16", "per_channel-bf16"],
)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_int8_group_sizes(impl, group_size, dtype):
    _check_kernel(impl, 7, 256, 128, "int8", group_size, dtype)


@pytest.mark.parametrize(
    "kind,group_size,dtype",
    [
        ("int4", 32, np.float32),
        ("int4", 128, np.float32),
        ("int4_asym", 64, np.float32),
        ("int4", 64, BF16),
        ("int4_asym", 128, BF16),
    ],
)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_int4_modes(impl, kind, group_size, dtype):
    _check_kernel(impl, 7, 256, 128, kind, group_size, dtype)


@pytest.mark.parametrize(
    "m,k,n,kind,group_size,dtype",
    [
        (1, 384, 384, "int8", 32, np.float32),  # decode row; several K and N blocks
        (1, 768, 256, "int4_asym", 64, BF16),  # several K blocks per half
        (300, 256, 128, "int8", 64, BF16),  # several row blocks, the last one partial
        (5, 96, 48, "int8", 32, np.float32),  # K, N not multiples of 128: one whole block
        (3, 64, 32, "int4", 32, np.float32),  # K / 2 = 32: TPU variant splits x into its halves
        (2, 576, 64, "int8", 32, np.float32),  # K over 128, off the 128 grid: a narrower last slice (SmolLM2)
        (2, 1152, 64, "int4", 32, np.float32),  # the same per half
    ],
)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_shapes(impl, m, k, n, kind, group_size, dtype):
    _check_kernel(impl, m, k, n, kind, group_size, dtype)


# ---- implementation choice and bad input ---------------------------------------------------------


def test_default_implementation_by_backend(monkeypatch):
    assert qm_kernel.pick_implementation(None, interpret=True) == "tpu"  # CPU, interpreted
    with pytest.raises(ValueError, match="backend 'cpu'"):
        qm_kernel.pick_implementation(None, interpret=False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert qm_kernel.pick_implementation(None, interpret=False) == "gpu"
    assert qm_kernel.pick_implementation("tpu", interpret=False) == "tpu"
    with pytest.raises(ValueError, match="'cuda'"):
        qm_kernel.pick_implementation("cuda", interpret=False)


X = jnp.zeros((2, 128), jnp.float32)
VALUES = jnp.zeros((8, 128), jnp.int8)
PACKED = jnp.zeros((8, 64), jnp.uint8)
PACKED_K192 = jnp.zeros((8, 96), jnp.uint8)
SCALES_G32 = jnp.ones((8, 4), jnp.float32)


@pytest.mark.parametrize(
    "x,weights,match",
    [
        (X, qm.Int8Weights(VALUES, jnp.ones((8, 3), jnp.float32)), "3 groups per row, which does not divide K = 128"),
        (X, qm.Int8Weights(VALUES, jnp.ones((8, 8), jnp.float32)), "group size 16"),
        (X, qm.Int8Weights(VALUES, jnp.ones((9, 4), jnp.float32)), r"\(9, 4\)"),
        (X, qm.Int8Weights(VALUES, jnp.ones((8, 4), jnp.float16)), "float16"),
        (X, qm.Int8Weights(VALUES.astype(jnp.int16), SCALES_G32), "int16"),
        (X.astype(jnp.int32), qm.Int8Weights(VALUES, SCALES_G32), "x dtype int32"),
        (jnp.zeros((2, 256)), qm.Int8Weights(VALUES, SCALES_G32), "K = 256"),
        (jnp.zeros((2, 3, 128)), qm.Int8Weights(VALUES, SCALES_G32), r"\(2, 3, 128\)"),
        (X, qm.Int4Weights(PACKED, jnp.ones((8, 1), jnp.float32)), "int4 group size 128"),
        (jnp.zeros((2, 192)), qm.Int4Weights(PACKED_K192, jnp.ones((8, 3), jnp.float32)), "K / 2 = 96"),
        (X, qm.Int4Weights(PACKED, SCALES_G32, jnp.ones((8, 2), jnp.float32)), "mins"),
        (X, qm.Int4Weights(PACKED.astype(jnp.int8), SCALES_G32), "int8"),
        (X, jnp.zeros((8, 128)), "weights must be Int8Weights or Int4Weights"),
    ],
)
def test_bad_input_raises(x, weights, match):
    with pytest.raises(ValueError, match=match):
        qm.quantized_matmul(x, weights, interpret=True)


@pytest.mark.parametrize(
    "x,weights,match",
    [
        (X, qm.Int8Weights(jnp.zeros((40, 128), jnp.int8), jnp.ones((40, 4), jnp.float32)), "N = 40"),
        (jnp.zeros((2, 40)), qm.Int8Weights(jnp.zeros((16, 40), jnp.int8), jnp.ones((16, 1), jnp.float32)), "K = 40"),
    ],
)
def test_gpu_variant_needs_multiples_of_16(x, weights, match):
    with pytest.raises(ValueError, match=match):
        qm.quantized_matmul(x, weights, interpret=True, implementation="gpu")


def test_quantize_rejects_a_group_size_not_dividing_k():
    with pytest.raises(ValueError, match="group_size 48"):
        qm.quantize_int8(jnp.ones((2, 128)), 48)
    with pytest.raises(ValueError, match="group_size 48"):
        qm.quantize_int4(jnp.ones((2, 128)), 48)


# ---- lowering for TPU and CUDA -------------------------------------------------------------------

S = jax.ShapeDtypeStruct
HIDDEN, INTERMEDIATE = 4096, 14336


def _abstract_int8(n: int, k: int, group_size: int) -> qm.Int8Weights:
    return qm.Int8Weights(S((n, k), jnp.int8), S((n, k // group_size), jnp.float32))


def _abstract_int4(n: int, k: int, group_size: int, symmetric: bool) -> qm.Int4Weights:
    scales = S((n, k // group_size), jnp.float32)
    return qm.Int4Weights(S((n, k // 2), jnp.uint8), scales, None if symmetric else scales)


# name: (rows of x, weights); Llama-3-8B's MLP projections, plus small shapes off the 128 grid.
LOWERING_CASES = {
    "up_int8_g128": (64, _abstract_int8(INTERMEDIATE, HIDDEN, 128)),
    "up_int8_per_channel": (64, _abstract_int8(INTERMEDIATE, HIDDEN, HIDDEN)),
    "up_int4_g32": (64, _abstract_int4(INTERMEDIATE, HIDDEN, 32, symmetric=True)),
    "down_int4_asym_g64": (64, _abstract_int4(HIDDEN, INTERMEDIATE, 64, symmetric=False)),
    "decode_down_int8_g32": (1, _abstract_int8(HIDDEN, INTERMEDIATE, 32)),
    "small_int8_k96_n48": (5, _abstract_int8(48, 96, 32)),
    "small_int4_k64_n32": (3, _abstract_int4(32, 64, 32, symmetric=False)),
    "smollm2_gate_int8_g32": (1, _abstract_int8(1536, 576, 32)),
}


def _export(impl: str, x: S, weights) -> jax.export.Exported:
    platform = {"tpu": "tpu", "gpu": "cuda"}[impl]
    disabled = [jax.export.DisabledSafetyCheck.custom_call(t) for t in TRITON_TARGETS]
    fn = jax.jit(functools.partial(qm.quantized_matmul, implementation=impl))
    return jax.export.export(fn, platforms=[platform], disabled_checks=disabled)(x, weights)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("name", LOWERING_CASES)
def test_tpu_variant_lowers_for_tpu(name, dtype):
    m, weights = LOWERING_CASES[name]
    exported = _export("tpu", S((m, weights.shape[1]), dtype), weights)
    assert exported.out_avals[0].shape == (m, weights.shape[0]) and exported.out_avals[0].dtype == dtype
    assert "tpu_custom_call" in exported.mlir_module()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("name", LOWERING_CASES)
def test_gpu_variant_lowers_for_cuda(name, dtype):
    m, weights = LOWERING_CASES[name]
    exported = _export("gpu", S((m, weights.shape[1]), dtype), weights)
    assert exported.out_avals[0].shape == (m, weights.shape[0]) and exported.out_avals[0].dtype == dtype
    assert any(target in exported.mlir_module() for target in TRITON_TARGETS)
