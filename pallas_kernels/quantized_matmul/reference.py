"""Plain-jnp reference for `quantized_matmul`: dequantize to float32, then one float32 matmul."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.quantized_matmul import layout


def quantized_matmul_reference(
    x: jax.Array,  # [M, K] float32 or bfloat16
    weights: layout.QuantizedWeights,  # dense shape [N, K]
) -> jax.Array:  # [M, N] x.dtype
    """`x @ dequantize(weights).T`, accumulated in float32 at full precision."""
    w = layout.dequantize(weights)
    out = jax.lax.dot_general(
        x.astype(jnp.float32),
        w,
        dimension_numbers=(((1,), (1,)), ((), ())),
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )
    return out.astype(x.dtype)
