"""The model's matmuls by kernel mode: float weights (XLA, or the native CPU kernel for few rows) and
quantized weights (the Pallas kernel, the native CPU kernel, or the XLA reference)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jinfer import native
from jinfer.ops import backend as kernel_backend
from jinfer.quantize import ACTIVATION_BLOCK, DynamicInt8Weights, PanelInt4Weights
from pallas_kernels import quantized_matmul as qmm


def dense_matmul(x, kernel, *, kernels: str | None = None):
    """x: [M, fan_in]; kernel: [fan_out, fan_in] -> [M, fan_out] float32.

    In kernel mode "native" (None: the enclosing kernel_scope's) a few float32 rows run through the
    native CPU kernel. Otherwise XLA: a single row as kernel · xᵀ, which XLA:CPU streams through its
    matrix-vector product about 1.4x faster than x · kernelᵀ.
    """
    if kernel_backend.resolve(kernels) == "native" and native.supports_dense(x, kernel):
        return native.dense_matmul(x, kernel)
    if x.shape[0] == 1:
        return jnp.einsum("oi,ti->ot", kernel, x, preferred_element_type=jnp.float32).reshape(1, -1)
    return jnp.einsum("ti,oi->to", x, kernel, preferred_element_type=jnp.float32)


def quantized_matmul(x, weights: qmm.QuantizedWeights | PanelInt4Weights, *, kernels: str | None = None):
    """x: [M, K] float32 or bfloat16; weights: int8 / int4 weights of dense shape [N, K] (HF's
    [out, in] layout) -> [M, N] in x's dtype, `x @ dequantize(weights).T` accumulated in float32.

    `kernels` (None: the enclosing kernel_scope's mode) picks the Pallas kernel, the native CPU
    kernel (for the shapes it takes; w8a8 activations are rounded to int8 first, as in the reference;
    the w4a8 / w4a16 kernel rounds them itself) or the XLA reference (jinfer.ops.backend). The Pallas
    kernels multiply w8a8 and w4a8 / w4a16 weights as plain int8 / int4 weights, activations unrounded.
    """
    mode = kernel_backend.resolve(kernels)
    if mode == "native" and native.supports_quantized(x, weights):
        if isinstance(weights, DynamicInt8Weights):  # the same rounding of the activations as int8_dynamic_matmul
            values, scales = quantize_rows(x)
            x = values.astype(jnp.float32) * scales
        return native.quantized_matmul(x, weights).astype(x.dtype)
    if mode in ("reference", "native"):  # takes any group size dividing K; the kernels check their own limits
        if x.shape[-1] != weights.shape[1]:
            raise ValueError(f"x has K = {x.shape[-1]} input features but the weights have K = {weights.shape[1]}")
        if isinstance(weights, DynamicInt8Weights):
            return int8_dynamic_matmul(x, weights)
        if isinstance(weights, PanelInt4Weights):
            return int4_dynamic_matmul(x, weights)
        return qmm.quantized_matmul_reference(x, weights)
    if isinstance(weights, DynamicInt8Weights):  # the kernels take them as plain int8 weights
        weights = qmm.Int8Weights(weights.values, weights.scales)
    if isinstance(weights, PanelInt4Weights):
        weights = weights.as_int4()
    return qmm.quantized_matmul(x, weights, interpret=mode == "interpret")


def quantize_rows(x):
    """x: [M, K] float -> ([M, K] int8, [M, 1] float32 scales): symmetric, scale = max|row| / 127."""
    x = x.astype(jnp.float32)
    scales = jnp.max(jnp.abs(x), axis=1, keepdims=True) / 127.0
    values = jnp.round(x / jnp.where(scales == 0, 1.0, scales))
    return jnp.clip(values, -127, 127).astype(jnp.int8), scales


def int8_dynamic_matmul(x, weights: DynamicInt8Weights):
    """x: [M, K] float; weights: [N, K] int8 with scales [N, 1] -> [M, N] in x's dtype.

    The rows of x are quantized to int8 and multiplied by the int8 weights with int32 accumulation
    (exact), then scaled by both scales. A single row is padded to two: XLA:CPU hands int8 dots of
    two or more rows to its int8 GEMM (oneDNN), but runs a one-row product as a scalar loop, about
    8x slower (measured: 0.21 ms for 2 x 576 -> 1536 against 1.8 ms for 1 row).
    """
    rows = x.shape[0]
    values, scales = quantize_rows(x)
    if rows == 1:
        values = jnp.pad(values, ((0, 1), (0, 0)))
    acc = jax.lax.dot_general(values, weights.values, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    return (acc[:rows].astype(jnp.float32) * scales * weights.scales[:, 0]).astype(x.dtype)


FINE_STEPS = 254  # 16-bit activations: steps of the second int8 part per step of the first


def round_activation_blocks(x, bits: int = 8):
    """x: [M, K] float, K % 32 == 0 -> [M, K] float32, as the w4a8 / w4a16 CPU kernel rounds its
    activations: each block of 32 columns in int8 steps of max|block| / 127 (ties to even); with
    `bits` 16, what that leaves is rounded again in steps 254 times finer (a second int8 part)."""
    rows, cols = x.shape
    blocks = x.astype(jnp.float32).reshape(rows, cols // ACTIVATION_BLOCK, ACTIVATION_BLOCK)
    scales = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True) / 127.0
    steps = blocks / jnp.where(scales == 0, 1.0, scales)
    values = jnp.round(steps)
    if bits == 16:  # steps - values is exact, so this rounds as the kernel does
        values = values + jnp.round((steps - values) * FINE_STEPS) / FINE_STEPS
    return (values * scales).reshape(rows, cols)


def int4_dynamic_matmul(x, weights: PanelInt4Weights):
    """x: [M, K] float; weights: w4a8 / w4a16 of dense shape [N, K] -> [M, N] in x's dtype: the
    rounded activations (`round_activation_blocks`) times the dequantized weights, in float32."""
    rounded = round_activation_blocks(x, weights.activation_bits)
    return qmm.quantized_matmul_reference(rounded, weights.as_int4()).astype(x.dtype)
