"""TPU (Mosaic) variant of `quantized_matmul`.

Grid (row blocks, output-feature blocks, input-feature blocks); the last axis is the reduction,
accumulated in a float32 VMEM scratch and written out at its last step. Each step multiplies an
activation block [tm, tk] by a weight block [tn, tk] "NT" (contracting the lane axis of both),
group by group, and scales each group's partial product by a row of scales [1, tn].

To keep every slice lane-aligned, a block is processed in slices of max(G, 128) lanes; when a
slice holds several groups (G < 128), each group's product uses the whole slice with the other
groups' activations zeroed, and is scaled separately. The scales are passed transposed,
[K // G, 1, N], so a group's scales are a lane-dense row (this transposes the small scale array,
4 / G bytes per weight, on every call).

int4: the packed block [tn, tk] holds columns [k0, k0 + tk) in its low nibbles and
[K/2 + k0, K/2 + k0 + tk) in its high nibbles; the activation is read as two blocks, one from
each half, and each nibble plane is multiplied by its own activation block. Asymmetric weights
add `sum(x_g) * min_g` per group.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.quantized_matmul import layout

LANES = 128
K_BLOCKS = (512, 256, 128)
N_BLOCKS = (512, 256, 128)
MAX_ROW_BLOCK = 256


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static block structure of one call."""

    tm: int  # activation rows per block
    tn: int  # output features per block
    tk: int  # input features per block (per half for int4)
    group_size: int
    dtype: jnp.dtype  # the activations' dtype, also the MXU operand dtype

    @property
    def slice_width(self) -> int:
        """Lanes multiplied at once: whole groups, at least 128 lanes, at most the block."""
        return min(self.tk, max(self.group_size, LANES))

    @property
    def scale_rows(self) -> int:
        """Groups (rows of transposed scales) per block."""
        return max(self.tk // self.group_size, 1)

    @property
    def precision(self) -> jax.lax.Precision:
        """Full float32 on the MXU for float32 activations."""
        if self.dtype == jnp.float32:
            return jax.lax.Precision.HIGHEST
        return jax.lax.Precision.DEFAULT


def _divisor_block(dim: int, candidates: tuple[int, ...]) -> int:
    """The first candidate that divides `dim`, else the whole dimension."""
    return next((c for c in candidates if dim % c == 0), dim)


def _plan(x: jax.Array, n: int, k_per_half: int, group_size: int) -> _Plan:  # x: [M, K]
    rows = x.shape[0]
    return _Plan(
        tm=rows if rows <= MAX_ROW_BLOCK else MAX_ROW_BLOCK,
        tn=_divisor_block(n, N_BLOCKS),
        tk=_divisor_block(k_per_half, K_BLOCKS),
        group_size=group_size,
        dtype=jnp.dtype(x.dtype),
    )


def _transposed(per_group: jax.Array) -> jax.Array:
    """[N, K // G] -> [K // G, 1, N]: each group's values as one lane-dense row."""
    return per_group.T[:, None, :]


def _dot_nt(a: jax.Array, b: jax.Array, precision) -> jax.Array:
    """a [tm, w] x b [tn, w] -> [tm, tn] float32, contracting the last axis of both."""
    return jax.lax.dot_general(
        a, b, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def _block_product(
    x_ref,  # [tm, tk] activations
    q: jax.Array,  # [tn, tk] integer weights in the MXU dtype (nibbles already offset if symmetric)
    s_ref,  # [scale_rows, 1, tn] scales of the block's groups
    m_ref,  # [scale_rows, 1, tn] mins, or None
    plan: _Plan,
) -> jax.Array:  # [tm, tn] float32
    """Sum over the block's groups g of (x_g @ q_g.T) * scale_g (+ sum(x_g) * min_g)."""
    width, group = plan.slice_width, plan.group_size
    total = jnp.zeros((x_ref.shape[0], q.shape[0]), jnp.float32)
    for start in range(0, plan.tk, width):  # the last slice is narrower when width does not divide tk
        stop = min(start + width, plan.tk)
        xs = x_ref[:, start:stop]
        qs = q[:, start:stop]
        lane = jax.lax.broadcasted_iota(jnp.int32, xs.shape, 1)
        groups_per_slice = max((stop - start) // group, 1)
        for j in range(groups_per_slice):
            in_group = (lane >= j * group) & (lane < (j + 1) * group)
            xg = xs if groups_per_slice == 1 else jnp.where(in_group, xs, 0)
            row = start // group + j
            total += _dot_nt(xg, qs, plan.precision) * s_ref[row]
            if m_ref is not None:
                total += jnp.sum(xg.astype(jnp.float32), axis=1, keepdims=True) * m_ref[row]
    return total


def _accumulate(acc_ref, o_ref, product: jax.Array) -> None:  # acc, o, product: [tm, tn]
    """Adds this step's product to the accumulator; writes the output at the last step."""
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += product

    @pl.when(k == pl.num_programs(2) - 1)
    def _store():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _as_operand(q: jax.Array, dtype) -> jax.Array:
    """Small integers -> the MXU operand dtype (exact: |q| <= 127)."""
    return q.astype(jnp.float32).astype(dtype)


def _int8_kernel(x_ref, q_ref, s_ref, o_ref, acc_ref, *, plan: _Plan):
    # x [tm, tk], q [tn, tk] int8, s [scale_rows, 1, tn], o [tm, tn], acc [tm, tn] f32
    q = _as_operand(q_ref[...], plan.dtype)
    _accumulate(acc_ref, o_ref, _block_product(x_ref, q, s_ref, None, plan))


def _int4_kernel(x_lo_ref, x_hi_ref, p_ref, s_lo_ref, s_hi_ref, *refs, plan: _Plan, symmetric: bool):
    # x_lo, x_hi [tm, tk]; p [tn, tk] int8 (packed bytes); s_lo, s_hi (and m_lo, m_hi if
    # asymmetric) [scale_rows, 1, tn]; then o [tm, tn] and acc [tm, tn] f32
    m_lo_ref, m_hi_ref = (None, None) if symmetric else refs[:2]
    o_ref, acc_ref = refs[-2:]
    packed = p_ref[...].astype(jnp.int32)
    offset = layout.INT4_ZERO if symmetric else 0
    lo = _as_operand((packed & 0xF) - offset, plan.dtype)
    hi = _as_operand(((packed >> 4) & 0xF) - offset, plan.dtype)
    product = _block_product(x_lo_ref, lo, s_lo_ref, m_lo_ref, plan)
    product += _block_product(x_hi_ref, hi, s_hi_ref, m_hi_ref, plan)
    _accumulate(acc_ref, o_ref, product)


def _call(kernel, operands, in_specs, plan: _Plan, m: int, n: int, num_k_blocks: int, interpret):
    grid = (pl.cdiv(m, plan.tm), pl.cdiv(n, plan.tn), num_k_blocks)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), plan.dtype),
        grid=grid,
        in_specs=in_specs,
        out_specs=pl.BlockSpec((plan.tm, plan.tn), lambda i, j, k: (i, j)),
        scratch_shapes=[pltpu.VMEM((plan.tm, plan.tn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        # The TPU interpreter raises on out-of-bounds block indices and fills fresh VMEM with NaN.
        interpret=pltpu.InterpretParams() if interpret else False,
        name="quantized_matmul_tpu",
    )(*operands)


def _scale_spec(plan: _Plan, first_block: int = 0) -> pl.BlockSpec:
    """Blocks of transposed scales [K // G, 1, N] for input-feature block k (+ first_block)."""
    features = max(plan.group_size, plan.tk)
    return pl.BlockSpec(
        (plan.scale_rows, 1, plan.tn),
        lambda i, j, k: (jax.lax.div((first_block + k) * plan.tk, features), 0, j),
    )


def _x_spec(plan: _Plan, first_block: int = 0) -> pl.BlockSpec:
    """Activation blocks [tm, tk] for input-feature block k (+ first_block)."""
    return pl.BlockSpec((plan.tm, plan.tk), lambda i, j, k: (i, first_block + k))


def _int8(x: jax.Array, w: layout.Int8Weights, interpret) -> jax.Array:  # x: [M, K]
    (m, k), n = x.shape, w.shape[0]
    plan = _plan(x, n, k, w.group_size)
    in_specs = [
        _x_spec(plan),
        pl.BlockSpec((plan.tn, plan.tk), lambda i, j, k: (j, k)),
        _scale_spec(plan),
    ]
    kernel = functools.partial(_int8_kernel, plan=plan)
    operands = (x, w.values, _transposed(w.scales))
    return _call(kernel, operands, in_specs, plan, m, n, k // plan.tk, interpret)


def _int4(x: jax.Array, w: layout.Int4Weights, interpret) -> jax.Array:  # x: [M, K]
    (m, k), n = x.shape, w.shape[0]
    half = k // 2
    plan = _plan(x, n, half, w.group_size)
    half_blocks = half // plan.tk
    if plan.tk % LANES == 0:
        # Both halves are lane-aligned blocks of x itself.
        x_lo, x_hi, hi_offset = x, x, half_blocks
    else:
        # A small K: each half becomes its own (full-width) array.
        x_lo, x_hi, hi_offset = x[:, :half], x[:, half:], 0
    scale_specs = [_scale_spec(plan), _scale_spec(plan, half_blocks)]
    in_specs = [
        _x_spec(plan),
        _x_spec(plan, hi_offset),
        pl.BlockSpec((plan.tn, plan.tk), lambda i, j, k: (j, k)),
    ]
    operands = [x_lo, x_hi, jax.lax.bitcast_convert_type(w.packed, jnp.int8)]
    operands += [_transposed(w.scales)] * 2
    in_specs += scale_specs
    if not w.symmetric:
        operands += [_transposed(w.mins)] * 2
        in_specs += scale_specs
    kernel = functools.partial(_int4_kernel, plan=plan, symmetric=w.symmetric)
    return _call(kernel, operands, in_specs, plan, m, n, half_blocks, interpret)


def quantized_matmul(
    x: jax.Array,  # [M, K] float32 or bfloat16
    weights: layout.QuantizedWeights,  # dense shape [N, K], already validated
    *,
    interpret: bool = False,
) -> jax.Array:  # [M, N] x.dtype
    """The Mosaic kernel; see the module docstring for its block structure."""
    if isinstance(weights, layout.Int8Weights):
        return _int8(x, weights, interpret)
    return _int4(x, weights, interpret)
