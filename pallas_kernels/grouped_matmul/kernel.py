"""`grouped_matmul`: the MoE grouped matmul (rows sorted by expert, one rhs per expert).

`out[r] = lhs[r] @ rhs[e]` for the rows r of group e (group e owns the `group_sizes[e]` rows
after those of groups 0..e-1); rows after the last group are 0. With `transpose_rhs`, rhs is
given as [E, N, K] (each group's matrix stored [out, in], HF's layout) and `out[r] = lhs[r] @
rhs[e].T`, read in place: no transposed copy of the weights is made. Input validation lives here;
the block structure lives in `tpu.py` (Mosaic, scalar-prefetched work list) and `gpu.py`
(Triton, work list read by each program), both driven by `segments.py`, and imported on first
use (Pallas's TPU and Triton modules slow a CPU start).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import pick_implementation

ACTIVATION_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def rhs_dims(rhs: jax.Array, transpose_rhs: bool) -> tuple[int, int]:
    """(K, N) of rhs [E, K, N], or of rhs [E, N, K] when `transpose_rhs`."""
    _, k, n = rhs.shape
    return (n, k) if transpose_rhs else (k, n)


def _check_rhs(lhs: jax.Array, rhs: jax.Array, rhs_scales: jax.Array | None, transpose_rhs: bool) -> None:
    # lhs [M, K], rhs [E, K, N] ([E, N, K] if transpose_rhs), rhs_scales [E, N] or None
    if rhs.ndim != 3:
        layout = "[E, N, K] (transpose_rhs)" if transpose_rhs else "[E, K, N]"
        raise ValueError(f"rhs must be {layout}, got shape {rhs.shape}")
    k, n = rhs_dims(rhs, transpose_rhs)
    if k != lhs.shape[1]:
        raise ValueError(f"rhs has K = {k} but lhs has K = {lhs.shape[1]}")
    if rhs.dtype == jnp.int8:
        expected = (rhs.shape[0], n)
        if rhs_scales is None:
            raise ValueError("int8 rhs needs rhs_scales [E, N], got None")
        if rhs_scales.shape != expected or rhs_scales.dtype != jnp.float32:
            raise ValueError(
                f"rhs_scales must be float32 {list(expected)}, got {rhs_scales.dtype} {rhs_scales.shape}"
            )
        return
    if rhs.dtype != lhs.dtype:
        raise ValueError(f"rhs dtype {rhs.dtype} does not match lhs dtype {lhs.dtype} (or int8)")
    if rhs_scales is not None:
        raise ValueError(f"rhs_scales are only for int8 rhs, got them with rhs dtype {rhs.dtype}")


def validate(
    lhs: jax.Array,  # [M, K]
    rhs: jax.Array,  # [E, K, N], or [E, N, K] if transpose_rhs
    group_sizes: jax.Array,  # [E]
    rhs_scales: jax.Array | None = None,  # [E, N]
    transpose_rhs: bool = False,
) -> None:
    """Raises ValueError, naming the bad value, unless the grouped matmul is supported."""
    if lhs.ndim != 2:
        raise ValueError(f"lhs must be [M, K], got shape {lhs.shape}")
    if lhs.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"lhs dtype {lhs.dtype} is not float32 or bfloat16")
    _check_rhs(lhs, rhs, rhs_scales, transpose_rhs)
    if group_sizes.ndim != 1 or group_sizes.shape[0] != rhs.shape[0]:
        raise ValueError(
            f"group_sizes must be [E] = [{rhs.shape[0]}], got shape {group_sizes.shape}"
        )
    if group_sizes.dtype != jnp.int32:
        raise ValueError(f"group_sizes must be int32, got dtype {group_sizes.dtype}")


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "interpret", "implementation"))
def grouped_matmul(
    lhs: jax.Array,  # [M, K] float32 or bfloat16, rows sorted by group
    rhs: jax.Array,  # [E, K, N] (or [E, N, K] if transpose_rhs) lhs.dtype, or int8
    group_sizes: jax.Array,  # [E] int32, sum <= M
    *,
    rhs_scales: jax.Array | None = None,  # [E, N] float32, required with int8 rhs
    transpose_rhs: bool = False,
    interpret: bool = False,
    implementation: str | None = None,
) -> jax.Array:  # [M, N] lhs.dtype
    """Grouped matmul with float32 accumulation, output in `lhs.dtype`.

    Empty groups are allowed; rows past `sum(group_sizes)` are 0. `transpose_rhs`: rhs is
    [E, N, K] and each group multiplies by rhs[e].T. `implementation` "tpu" or "gpu" picks the
    kernel variant; None picks by the default backend (the TPU variant when interpreting on CPU).
    `interpret` runs the kernel in Pallas's interpreter.
    """
    validate(lhs, rhs, group_sizes, rhs_scales, transpose_rhs)
    if pick_implementation(implementation, interpret) == "gpu":
        from pallas_kernels.grouped_matmul import gpu as variant
    else:
        from pallas_kernels.grouped_matmul import tpu as variant
    return variant.grouped_matmul(lhs, rhs, group_sizes, rhs_scales, transpose_rhs=transpose_rhs, interpret=interpret)
