"""Matmuls against quantized weights: the Pallas kernel or its XLA reference, by kernel mode."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jinfer.ops import backend as kernel_backend
from jinfer.quantize import DynamicInt8Weights
from pallas_kernels import quantized_matmul as qmm


def quantized_matmul(x, weights: qmm.QuantizedWeights, *, kernels: str | None = None):
    """x: [M, K] float32 or bfloat16; weights: int8 / int4 weights of dense shape [N, K] (HF's
    [out, in] layout) -> [M, N] in x's dtype, `x @ dequantize(weights).T` accumulated in float32.

    `kernels` (None: the enclosing kernel_scope's mode) picks the Pallas kernel or the XLA
    reference (jinfer.ops.backend).
    """
    mode = kernel_backend.resolve(kernels)
    if mode == "reference":  # takes any group size dividing K; the kernels check their own limits
        if x.shape[-1] != weights.shape[1]:
            raise ValueError(f"x has K = {x.shape[-1]} input features but the weights have K = {weights.shape[1]}")
        if isinstance(weights, DynamicInt8Weights):
            return int8_dynamic_matmul(x, weights)
        return qmm.quantized_matmul_reference(x, weights)
    if isinstance(weights, DynamicInt8Weights):  # the kernels take them as plain int8 weights
        weights = qmm.Int8Weights(weights.values, weights.scales)
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
