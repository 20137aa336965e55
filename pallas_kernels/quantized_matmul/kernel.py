"""`quantized_matmul`: activations times int8 / int4 weights (HF layout), one entry point.

Input validation lives here; the block structure lives in `tpu.py` (Mosaic: a pipelined
(rows, out-features, in-features) grid with a VMEM accumulator) and `gpu.py` (Triton: a
(rows, out-features) grid with the input-feature loop inside the kernel). Both are imported on
first use: the package's layouts are used on CPU, where Pallas's TPU and Triton modules would only
slow the start (~0.2 s).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import pick_implementation
from pallas_kernels.quantized_matmul import layout

ACTIVATION_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
GROUP_SIZES = (32, 64, 128)


def _check_scale_array(name: str, array: jax.Array, rows: int, k: int) -> int:
    """Checks a [N, K // G] float32 per-group array and returns its group size G."""
    if array.ndim != 2 or array.shape[0] != rows or array.shape[1] == 0:
        raise ValueError(f"{name} must be [N, K // G] = [{rows}, K // G], got shape {array.shape}")
    if array.dtype != jnp.float32:
        raise ValueError(f"{name} must be float32, got dtype {array.dtype}")
    if k % array.shape[1]:
        raise ValueError(
            f"{name} has {array.shape[1]} groups per row, which does not divide K = {k}"
        )
    return k // array.shape[1]


def _check_int8(weights: layout.Int8Weights) -> None:
    values = weights.values
    if values.ndim != 2 or values.dtype != jnp.int8:
        raise ValueError(f"int8 values must be int8 [N, K], got {values.dtype} {values.shape}")
    n, k = values.shape
    group_size = _check_scale_array("scales", weights.scales, n, k)
    if group_size not in GROUP_SIZES and group_size != k:
        raise ValueError(f"int8 group size {group_size} must be one of {GROUP_SIZES} or K = {k}")


def _check_int4(weights: layout.Int4Weights) -> None:
    packed = weights.packed
    if packed.ndim != 2 or packed.dtype != jnp.uint8:
        raise ValueError(f"int4 packed must be uint8 [N, K // 2], got {packed.dtype} {packed.shape}")
    n, k = weights.shape
    group_size = _check_scale_array("scales", weights.scales, n, k)
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group size {group_size} must be one of {GROUP_SIZES}")
    if (k // 2) % group_size:
        raise ValueError(
            f"int4 group size {group_size} must divide K / 2 = {k // 2} (half-split layout)"
        )
    if weights.mins is not None:
        _check_scale_array("mins", weights.mins, n, k)
        if weights.mins.shape != weights.scales.shape:
            raise ValueError(
                f"mins shape {weights.mins.shape} != scales shape {weights.scales.shape}"
            )


def validate(x: jax.Array, weights: layout.QuantizedWeights) -> None:  # x: [M, K]
    """Raises ValueError, naming the bad value, unless `x @ weights.T` is a supported product."""
    if x.ndim != 2:
        raise ValueError(f"x must be [M, K], got shape {x.shape}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not float32 or bfloat16")
    if isinstance(weights, layout.Int8Weights):
        _check_int8(weights)
    elif isinstance(weights, layout.Int4Weights):
        _check_int4(weights)
    else:
        raise ValueError(f"weights must be Int8Weights or Int4Weights, got {type(weights).__name__}")
    if x.shape[1] != weights.shape[1]:
        raise ValueError(f"x has K = {x.shape[1]} but the weights have K = {weights.shape[1]}")


@functools.partial(jax.jit, static_argnames=("interpret", "implementation"))
def quantized_matmul(
    x: jax.Array,  # [M, K] float32 or bfloat16
    weights: layout.QuantizedWeights,  # dense shape [N, K]
    *,
    interpret: bool = False,
    implementation: str | None = None,
) -> jax.Array:  # [M, N] x.dtype
    """`x @ dequantize(weights).T` with float32 accumulation, output in `x.dtype`.

    `implementation` "tpu" or "gpu" picks the kernel variant; None picks by the default backend
    (the TPU variant when interpreting on CPU). `interpret` runs the kernel in Pallas's
    interpreter (any backend, slow).
    """
    validate(x, weights)
    if pick_implementation(implementation, interpret) == "gpu":
        from pallas_kernels.quantized_matmul import gpu

        return gpu.quantized_matmul(x, weights, interpret=interpret)
    from pallas_kernels.quantized_matmul import tpu

    return tpu.quantized_matmul(x, weights, interpret=interpret)
