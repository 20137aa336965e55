"""Matmuls against quantized weights: the Pallas kernel or its XLA reference, by kernel mode."""

from __future__ import annotations

from jinfer.ops import backend as kernel_backend
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
        return qmm.quantized_matmul_reference(x, weights)
    return qmm.quantized_matmul(x, weights, interpret=mode == "interpret")
