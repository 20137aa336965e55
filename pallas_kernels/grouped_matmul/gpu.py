"""GPU (Triton) variant of `grouped_matmul`.

Triton has no scalar prefetch, so the work list (`segments.py`) is an ordinary int32 input that
each program reads. Grid (segments, output-feature blocks): program (w, j) loads its segment's
tile, group and row range, loops over the input features with `tl.dot` on [bm, bk] x [bk, bn]
blocks of lhs and of its group's rhs (a [bn, bk] block of a transposed rhs, contracted on its
second axis; a loop of zero steps for padding and unused segments),
and stores only the segment's rows with a masked store. Segments partition the rows, so every
output row is written exactly once and programs never race. int8 rhs blocks are converted to
the lhs dtype in registers; their per-channel scales multiply the accumulated product once.
Rows are padded to the row tile so every load is in bounds.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.grouped_matmul import segments

ROW_TILES = (16, 32, 64)
BLOCKS = (64, 32, 16)
MIN_DOT_DIM = 16


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static block structure of one call."""

    bm: int  # rows per tile
    bk: int  # input features per loop step
    bn: int  # output features per program
    num_groups: int
    dtype: jnp.dtype  # lhs dtype, also the tl.dot operand dtype
    transpose_rhs: bool  # rhs is [E, N, K]

    @property
    def precision(self) -> jax.lax.Precision:
        """IEEE float32 dots (no TF32) for float32 operands."""
        if self.dtype == jnp.float32:
            return jax.lax.Precision.HIGHEST
        return jax.lax.Precision.DEFAULT


def _first_divisor(dim: int, name: str) -> int:
    """The first (largest) block that divides `dim`; Triton blocks are powers of two."""
    for c in BLOCKS:
        if dim % c == 0:
            return c
    raise ValueError(f"the GPU kernel needs {name} = {dim} to be a multiple of {MIN_DOT_DIM}")


def _as_operand(block: jax.Array, dtype) -> jax.Array:
    """An rhs block in the tl.dot operand dtype: int8 converted (exactly), float passed through."""
    if block.dtype == dtype:
        return block
    return block.astype(jnp.float32).astype(dtype)


def _rhs_product(lhs: jax.Array, rhs_ref, expert, k_block, cols, plan: _Plan) -> jax.Array:
    """lhs: [bm, bk] -> [bm, bn] float32, times the rhs block (expert, k_block, cols) of rhs_ref
    [E, K, N] (or the block (expert, cols, k_block) of [E, N, K] if transposed)."""
    if plan.transpose_rhs:
        block, contracting = rhs_ref[expert, cols, k_block], 1  # [bn, bk]
    else:
        block, contracting = rhs_ref[expert, k_block, cols], 0  # [bk, bn]
    return jax.lax.dot_general(
        lhs,
        _as_operand(block, plan.dtype),
        (((1,), (contracting,)), ((), ())),
        precision=plan.precision,
        preferred_element_type=jnp.float32,
    )


def _kernel(tiles_ref, groups_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, *refs, plan: _Plan, k: int):
    # whole arrays: tiles, groups, starts, ends [num_segments] int32, lhs [Mp, K],
    # rhs [E, K, N] or [E, N, K] (float or int8), then scales [E, N] float32 if int8, out [Mp, N]
    scale_ref = refs[0] if len(refs) == 2 else None
    o_ref = refs[-1]
    w = pl.program_id(0)
    cols = pl.ds(pl.multiple_of(pl.program_id(1) * plan.bn, plan.bn), plan.bn)
    tile, group = tiles_ref[w], groups_ref[w]
    start, end = starts_ref[w], ends_ref[w]
    rows = pl.ds(pl.multiple_of(tile * plan.bm, plan.bm), plan.bm)
    expert = jnp.minimum(group, plan.num_groups - 1)

    def step(i, acc):  # acc: [bm, bn] float32
        k_block = pl.ds(pl.multiple_of(i * plan.bk, plan.bk), plan.bk)
        return acc + _rhs_product(lhs_ref[rows, k_block], rhs_ref, expert, k_block, cols, plan)

    num_steps = jnp.where(group < plan.num_groups, k // plan.bk, 0)
    acc = jax.lax.fori_loop(0, num_steps, step, jnp.zeros((plan.bm, plan.bn), jnp.float32))
    if scale_ref is not None:
        acc *= scale_ref[expert, cols][None, :]
    row_ids = tile * plan.bm + jax.lax.broadcasted_iota(jnp.int32, (plan.bm, plan.bn), 0)
    mine = (row_ids >= start) & (row_ids < end)
    pltriton.store(o_ref.at[rows, cols], acc.astype(o_ref.dtype), mask=mine)


def grouped_matmul(
    lhs: jax.Array,  # [M, K] float32 or bfloat16, rows sorted by group
    rhs: jax.Array,  # [E, K, N] (or [E, N, K] if transpose_rhs) lhs.dtype, or int8
    group_sizes: jax.Array,  # [E] int32
    rhs_scales: jax.Array | None = None,  # [E, N] float32 when rhs is int8
    *,
    transpose_rhs: bool = False,
    interpret: bool = False,
) -> jax.Array:  # [M, N] lhs.dtype
    """The Triton kernel; see the module docstring for its structure. Inputs already validated."""
    (m, k), num_groups, n = lhs.shape, rhs.shape[0], rhs.shape[1 if transpose_rhs else 2]
    plan = _Plan(
        bm=next((b for b in ROW_TILES if m <= b), ROW_TILES[-1]),
        bk=_first_divisor(k, "K"),
        bn=_first_divisor(n, "N"),
        num_groups=num_groups,
        dtype=jnp.dtype(lhs.dtype),
        transpose_rhs=transpose_rhs,
    )
    padded_m = pl.cdiv(m, plan.bm) * plan.bm
    work = segments.make_segments(group_sizes, m, plan.bm)
    operands = [jnp.pad(lhs, ((0, padded_m - m), (0, 0))), rhs]
    operands += [] if rhs_scales is None else [rhs_scales]
    out = pl.pallas_call(
        functools.partial(_kernel, plan=plan, k=k),
        out_shape=jax.ShapeDtypeStruct((padded_m, n), lhs.dtype),
        grid=(work.tiles.shape[0], n // plan.bn),
        compiler_params=pltriton.CompilerParams(),
        interpret=interpret,
        name="grouped_matmul_gpu",
    )(*work, *operands)
    return out[:m]
