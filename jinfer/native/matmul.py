"""XLA FFI calls of the matmul kernels in matmul.cc, and the shapes they take."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jinfer.native import library
from jinfer.native.library import LANES
from jinfer.quantize import ACTIVATION_BLOCK, DynamicInt8Weights, PanelInt4Weights
from pallas_kernels.quantized_matmul import Int4Weights, Int8Weights, QuantizedWeights

# Rows of x up to which the kernels beat XLA:CPU, by SmolLM2's layer shapes (WORKSPACE.md,
# "Native CPU kernels"): float32 and weight-only int8 / int4 products up to 32 rows (XLA's GEMM
# catches up with float32 weights there, and runs weight-only ones by dequantizing the matrix);
# w8a8 up to 16, past which XLA's int8 x int8 GEMM is faster.
MAX_ROWS = 32
MAX_W8A8_ROWS = 16


def _takes(x, fan_in: int, max_rows: int | None) -> bool:
    """x: [M, K] float32 with at most `max_rows` rows (None: any) and K a whole number of vectors."""
    rows_fit = max_rows is None or x.shape[0] <= max_rows
    return x.ndim == 2 and x.dtype == jnp.float32 and rows_fit and x.shape[1] == fan_in and fan_in % LANES == 0


def supports_dense(x, kernel) -> bool:
    """x: [M, K]; kernel: [N, K]."""
    return kernel.dtype == jnp.float32 and _takes(x, kernel.shape[1], MAX_ROWS)


def supports_quantized(x, weights: QuantizedWeights | PanelInt4Weights) -> bool:
    """x: [M, K]; weights of dense shape [N, K] whose groups are whole vectors (int4: K split in two
    halves of whole vectors too; w4a8: of 32-column blocks, for any number of rows of x)."""
    fan_in = weights.shape[1]
    if isinstance(weights, PanelInt4Weights):
        return fan_in % (2 * ACTIVATION_BLOCK) == 0 and _takes(x, fan_in, None)
    if isinstance(weights, Int4Weights) and fan_in % (2 * LANES):
        return False
    max_rows = MAX_W8A8_ROWS if isinstance(weights, DynamicInt8Weights) else MAX_ROWS
    return weights.group_size % LANES == 0 and _takes(x, fan_in, max_rows)


def _call(target: str, x, *operands):
    """x: [M, K] -> [M, N] float32, N the first axis of operands[0]."""
    out = jax.ShapeDtypeStruct((x.shape[0], operands[0].shape[0]), jnp.float32)
    return library.ffi_call(target, out)(x, *operands)


def dense_matmul(x, kernel):
    """x: [M, K] float32; kernel: [N, K] float32 -> [M, N] float32 (`supports_dense`)."""
    return _call("jinfer_matmul_f32", x, kernel)


def quantized_matmul(x, weights: QuantizedWeights | PanelInt4Weights):
    """x: [M, K] float32; weights: Int8Weights / Int4Weights of dense shape [N, K] -> [M, N] float32,
    `x @ dequantize(weights).T`; PanelInt4Weights: x rounded as jinfer.ops.matmul.round_activation_blocks
    rounds it, times the weights (`supports_quantized`)."""
    if isinstance(weights, PanelInt4Weights):
        return _call(f"jinfer_matmul_w4a{weights.activation_bits}", x, weights.packed, weights.scales, weights.mins)
    if isinstance(weights, Int8Weights):
        return _call("jinfer_matmul_int8", x, weights.values, weights.scales)
    if weights.symmetric:
        return _call("jinfer_matmul_int4_symmetric", x, weights.packed, weights.scales)
    return _call("jinfer_matmul_int4", x, weights.packed, weights.scales, weights.mins)
