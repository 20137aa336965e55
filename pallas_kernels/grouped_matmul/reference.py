"""Plain-jnp reference for `grouped_matmul`: `jax.lax.ragged_dot` in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_matmul_reference(
    lhs: jax.Array,  # [M, K] float32 or bfloat16, rows sorted by group
    rhs: jax.Array,  # [E, K, N] float, or int8
    group_sizes: jax.Array,  # [E] int32
    rhs_scales: jax.Array | None = None,  # [E, N] float32 when rhs is int8
) -> jax.Array:  # [M, N] lhs.dtype
    """Rows of group e times rhs[e] (int8 rhs dequantized first); rows past the groups are 0."""
    rhs = rhs.astype(jnp.float32)
    if rhs_scales is not None:
        rhs = rhs * rhs_scales[:, None, :]
    out = jax.lax.ragged_dot(
        lhs.astype(jnp.float32),
        rhs,
        group_sizes,
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )
    return out.astype(lhs.dtype)
