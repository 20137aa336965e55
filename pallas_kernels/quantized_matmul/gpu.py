"""GPU (Triton) variant of `quantized_matmul`.

Grid (row blocks, output-feature blocks); each program loops over the input features inside the
kernel in steps of one quantization group (per-channel scales: up to 128 columns), multiplies
x [bm, bk] by the weight block [bn, bk] "NT" with one `tl.dot`, and scales the partial product
by the group's scales [bn] (a strided read of one column of the [N, K // G] scales), so the
weights are never dequantized to memory. Rows are padded to the row block (`tl.dot` needs at
least 16 rows).

int4: each step reads one packed block [bn, bk] and does two dots: the low nibbles against
x[:, k0 : k0 + bk] and the high nibbles against x[:, K/2 + k0 : K/2 + k0 + bk]. Asymmetric
weights add `sum(x_g) * min_g` per group.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.quantized_matmul import layout

ROW_BLOCKS = (16, 32, 64)
N_BLOCKS = (64, 32, 16)
K_STEPS = (128, 64, 32, 16)
MIN_DOT_DIM = 16


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static block structure of one call."""

    bm: int  # activation rows per program
    bn: int  # output features per program
    bk: int  # input features per loop step (per half for int4)
    group_size: int
    dtype: jnp.dtype  # the activations' dtype, also the tl.dot operand dtype

    @property
    def precision(self) -> jax.lax.Precision:
        """IEEE float32 dots (no TF32) for float32 activations."""
        if self.dtype == jnp.float32:
            return jax.lax.Precision.HIGHEST
        return jax.lax.Precision.DEFAULT


def _first_divisor(dim: int, candidates: tuple[int, ...], name: str) -> int:
    """The first (largest) candidate block that divides `dim`; Triton blocks are powers of two."""
    for c in candidates:
        if dim % c == 0:
            return c
    raise ValueError(f"the GPU kernel needs {name} = {dim} to be a multiple of {MIN_DOT_DIM}")


def _plan(m: int, n: int, group_size: int, dtype) -> _Plan:
    """Steps of at most 128 columns that stay inside one group (G, or a divisor of K per channel)."""
    return _Plan(
        bm=next((b for b in ROW_BLOCKS if m <= b), ROW_BLOCKS[-1]),
        bn=_first_divisor(n, N_BLOCKS, "N"),
        bk=_first_divisor(group_size, K_STEPS, "K"),
        group_size=group_size,
        dtype=jnp.dtype(dtype),
    )


def _dot_nt(a: jax.Array, b: jax.Array, precision) -> jax.Array:
    """a [bm, bk] x b [bn, bk] -> [bm, bn] float32, contracting the last axis of both."""
    return jax.lax.dot_general(
        a, b, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def _as_operand(q: jax.Array, dtype) -> jax.Array:
    """Small integers -> the tl.dot operand dtype (exact: |q| <= 127)."""
    return q.astype(jnp.float32).astype(dtype)


def _program_blocks(plan: _Plan) -> tuple[pl.Slice, pl.Slice]:
    """This program's rows and output features."""
    rows = pl.ds(pl.multiple_of(pl.program_id(0) * plan.bm, plan.bm), plan.bm)
    cols = pl.ds(pl.multiple_of(pl.program_id(1) * plan.bn, plan.bn), plan.bn)
    return rows, cols


def _group_term(x: jax.Array, q: jax.Array, s_ref, m_ref, cols, group, plan: _Plan) -> jax.Array:
    # x [bm, bk], q [bn, bk] operands of one group; s_ref, m_ref [N, K // G] -> [bm, bn] float32
    term = _dot_nt(x, q, plan.precision) * s_ref[cols, group][None, :]
    if m_ref is not None:
        term += jnp.sum(x.astype(jnp.float32), axis=1, keepdims=True) * m_ref[cols, group][None, :]
    return term


def _int8_kernel(x_ref, q_ref, s_ref, o_ref, *, plan: _Plan, k: int):
    # whole arrays: x [Mp, K], q [N, K] int8, s [N, K // G] float32, o [Mp, N]
    rows, cols = _program_blocks(plan)

    def step(i, acc):  # acc: [bm, bn] float32
        k0 = pl.multiple_of(i * plan.bk, plan.bk)
        x = x_ref[rows, pl.ds(k0, plan.bk)]
        q = _as_operand(q_ref[cols, pl.ds(k0, plan.bk)], plan.dtype)
        return acc + _group_term(x, q, s_ref, None, cols, jax.lax.div(k0, plan.group_size), plan)

    acc = jax.lax.fori_loop(0, k // plan.bk, step, jnp.zeros((plan.bm, plan.bn), jnp.float32))
    o_ref[rows, cols] = acc.astype(o_ref.dtype)


def _int4_kernel(x_ref, p_ref, s_ref, *refs, plan: _Plan, k: int, symmetric: bool):
    # whole arrays: x [Mp, K], p [N, K // 2] uint8, s (and m if asymmetric) [N, K // G] float32,
    # then o [Mp, N]
    m_ref = None if symmetric else refs[0]
    o_ref = refs[-1]
    rows, cols = _program_blocks(plan)
    half = k // 2
    offset = layout.INT4_ZERO if symmetric else 0

    def step(i, acc):  # acc: [bm, bn] float32
        k0 = pl.multiple_of(i * plan.bk, plan.bk)
        packed = p_ref[cols, pl.ds(k0, plan.bk)].astype(jnp.int32)
        for nibbles, start in ((packed & 0xF, k0), (packed >> 4, half + k0)):
            x = x_ref[rows, pl.ds(start, plan.bk)]
            q = _as_operand(nibbles - offset, plan.dtype)
            acc += _group_term(x, q, s_ref, m_ref, cols, jax.lax.div(start, plan.group_size), plan)
        return acc

    acc = jax.lax.fori_loop(0, half // plan.bk, step, jnp.zeros((plan.bm, plan.bn), jnp.float32))
    o_ref[rows, cols] = acc.astype(o_ref.dtype)


def quantized_matmul(
    x: jax.Array,  # [M, K] float32 or bfloat16
    weights: layout.QuantizedWeights,  # dense shape [N, K], already validated
    *,
    interpret: bool = False,
) -> jax.Array:  # [M, N] x.dtype
    """The Triton kernel; see the module docstring for its block structure."""
    (m, k), n = x.shape, weights.shape[0]
    int8 = isinstance(weights, layout.Int8Weights)
    plan = _plan(m, n, weights.group_size, x.dtype)
    padded_m = pl.cdiv(m, plan.bm) * plan.bm
    x_padded = jnp.pad(x, ((0, padded_m - m), (0, 0)))
    if int8:
        kernel = functools.partial(_int8_kernel, plan=plan, k=k)
        operands = [x_padded, weights.values, weights.scales]
    else:
        kernel = functools.partial(_int4_kernel, plan=plan, k=k, symmetric=weights.symmetric)
        operands = [x_padded, weights.packed, weights.scales]
        operands += [] if weights.symmetric else [weights.mins]
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((padded_m, n), x.dtype),
        grid=(padded_m // plan.bm, n // plan.bn),
        compiler_params=pltriton.CompilerParams(),
        interpret=interpret,
        name="quantized_matmul_gpu",
    )(*operands)
    return out[:m]
