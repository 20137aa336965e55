"""TPU (Mosaic) variant of `grouped_matmul`.

The work list (`segments.py`) is computed from `group_sizes` outside the kernel and
scalar-prefetched into SMEM, where the index maps read it: grid (output-feature blocks,
segments, input-feature blocks). Segment w multiplies row tile `tiles[w]` of lhs by its group's
rhs block ([tk, tn], or [tn, tk] of a transposed rhs, contracted on its second axis),
accumulating over the input-feature axis in a float32 VMEM scratch; at the last
input-feature step it writes the rows of the tile that belong to the segment and leaves the
others. A tile's segments are consecutive, so its output block stays in VMEM across them, and
together they write each of its rows once. Padding segments and unused entries skip the matmul
(their accumulator stays zero, so padding rows get 0) and keep their block indices fixed, so
they fetch nothing new. int8 rhs blocks are converted to the lhs dtype in VMEM; their per-channel scales
multiply the accumulated product once.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.grouped_matmul import segments

ROW_TILE = 128
K_BLOCKS = (512, 256, 128)
N_BLOCKS = (512, 256, 128)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static block structure of one call."""

    tm: int  # rows per tile
    tk: int  # input features per block
    tn: int  # output features per block
    num_groups: int
    dtype: jnp.dtype  # lhs dtype, also the MXU operand dtype
    transpose_rhs: bool  # rhs is [E, N, K]

    @property
    def precision(self) -> jax.lax.Precision:
        """Full float32 on the MXU for float32 operands."""
        if self.dtype == jnp.float32:
            return jax.lax.Precision.HIGHEST
        return jax.lax.Precision.DEFAULT


def _divisor_block(dim: int, candidates: tuple[int, ...]) -> int:
    """The first candidate that divides `dim`, else the whole dimension."""
    return next((c for c in candidates if dim % c == 0), dim)


def _as_operand(block: jax.Array, dtype) -> jax.Array:
    """An rhs block in the MXU operand dtype: int8 converted (exactly), float passed through."""
    if block.dtype == dtype:
        return block
    return block.astype(jnp.float32).astype(dtype)


def _kernel(tiles_ref, groups_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, *refs, plan: _Plan):
    # SMEM: tiles, groups, starts, ends [num_segments] int32. VMEM: lhs [tm, tk], rhs [tk, tn]
    # or [tn, tk] if transposed (float or int8), then scales [1, tn] if int8, out [tm, tn], acc [tm, tn] float32.
    scale_ref = refs[0] if len(refs) == 3 else None
    o_ref, acc_ref = refs[-2:]
    w, k = pl.program_id(1), pl.program_id(2)
    active = groups_ref[w] < plan.num_groups  # not padding rows, not an unused entry

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(active)
    def _accumulate():
        rhs = _as_operand(rhs_ref[...], plan.dtype)
        contracting = 1 if plan.transpose_rhs else 0
        acc_ref[...] += jax.lax.dot_general(
            lhs_ref[...],
            rhs,
            (((1,), (contracting,)), ((), ())),
            precision=plan.precision,
            preferred_element_type=jnp.float32,
        )

    @pl.when(k == pl.num_programs(2) - 1)
    def _store():
        rows = tiles_ref[w] * plan.tm + jax.lax.broadcasted_iota(jnp.int32, acc_ref.shape, 0)
        mine = (rows >= starts_ref[w]) & (rows < ends_ref[w])
        product = acc_ref[...] if scale_ref is None else acc_ref[...] * scale_ref[...]
        o_ref[...] = jnp.where(mine, product.astype(o_ref.dtype), o_ref[...])


def _index_maps(num_groups: int, transpose_rhs: bool):
    """Block index maps: grid indices (j, w, k), then the prefetched work list."""

    def group_and_k(w, k, groups_ref):
        """Segment w's rhs group (clamped for padding) and K block (held at 0 for padding)."""
        group = groups_ref[w]
        return jnp.minimum(group, num_groups - 1), jnp.where(group < num_groups, k, 0)

    def lhs(j, w, k, tiles_ref, groups_ref, *_):
        return tiles_ref[w], group_and_k(w, k, groups_ref)[1]

    def rhs(j, w, k, tiles_ref, groups_ref, *_):
        group, k_block = group_and_k(w, k, groups_ref)
        return (group, j, k_block) if transpose_rhs else (group, k_block, j)

    def scale(j, w, k, tiles_ref, groups_ref, *_):
        return group_and_k(w, k, groups_ref)[0], 0, j

    def out(j, w, k, tiles_ref, *_):
        return tiles_ref[w], j

    return lhs, rhs, scale, out


def grouped_matmul(
    lhs: jax.Array,  # [M, K] float32 or bfloat16, rows sorted by group
    rhs: jax.Array,  # [E, K, N] (or [E, N, K] if transpose_rhs) lhs.dtype, or int8
    group_sizes: jax.Array,  # [E] int32
    rhs_scales: jax.Array | None = None,  # [E, N] float32 when rhs is int8
    *,
    transpose_rhs: bool = False,
    interpret: bool = False,
) -> jax.Array:  # [M, N] lhs.dtype
    """The Mosaic kernel; see the module docstring for its structure. Inputs already validated."""
    (m, k), num_groups, n = lhs.shape, rhs.shape[0], rhs.shape[1 if transpose_rhs else 2]
    plan = _Plan(
        tm=min(m, ROW_TILE),
        tk=_divisor_block(k, K_BLOCKS),
        tn=_divisor_block(n, N_BLOCKS),
        num_groups=num_groups,
        dtype=jnp.dtype(lhs.dtype),
        transpose_rhs=transpose_rhs,
    )
    work = segments.make_segments(group_sizes, m, plan.tm)
    lhs_map, rhs_map, scale_map, out_map = _index_maps(num_groups, transpose_rhs)
    rhs_block = (plan.tn, plan.tk) if transpose_rhs else (plan.tk, plan.tn)
    in_specs = [
        pl.BlockSpec((plan.tm, plan.tk), lhs_map),
        pl.BlockSpec((None, *rhs_block), rhs_map),
    ]
    operands = [lhs, rhs]
    if rhs_scales is not None:
        in_specs.append(pl.BlockSpec((None, 1, plan.tn), scale_map))
        operands.append(rhs_scales[:, None, :])
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(work),
        grid=(n // plan.tn, work.tiles.shape[0], k // plan.tk),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((plan.tm, plan.tn), out_map),
        scratch_shapes=[pltpu.VMEM((plan.tm, plan.tn), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_kernel, plan=plan),
        out_shape=jax.ShapeDtypeStruct((m, n), lhs.dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")
        ),
        # The TPU interpreter raises on out-of-bounds block indices and fills fresh VMEM with NaN.
        interpret=pltpu.InterpretParams() if interpret else False,
        name="grouped_matmul_tpu",
    )(*work, *operands)
