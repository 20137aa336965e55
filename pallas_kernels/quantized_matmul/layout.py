"""Quantized weight layouts for `quantized_matmul`, and exact quantize / dequantize in plain jnp.

Weights keep the Hugging Face layout, output features first: a dense weight is `[N, K]` and the
matmul is `x [M, K] @ w.T`. Columns are quantized in groups of `group_size` consecutive input
features, one float32 scale per (output row, group).

- `Int8Weights`: `values` int8 `[N, K]`, `scales` float32 `[N, K // G]`; `w = values * scale`.
  The kernels take `G` of 32, 64, 128 or `K` (one scale per output channel).
- `Int4Weights`: `packed` uint8 `[N, K // 2]` in a half-split layout: the low nibble of byte `j`
  is column `j`, the high nibble is column `j + K // 2`, so a kernel multiplies
  `x[:, :K/2]` by the low nibbles and `x[:, K/2:]` by the high nibbles without interleaving.
  `scales` float32 `[N, K // G]`; the kernels take `G` in {32, 64, 128}. With `mins` None the
  weights are symmetric, `w = (q - 8) * scale`; with `mins` float32 `[N, K // G]` they are
  asymmetric (GGUF Q4_1 style), `w = q * scale + min`. `q` is the nibble, 0..15.

`dequantize` and the reference take any `G` dividing `K`: GGUF's Q6_K, Q3_K and Q2_K weights
(`jinfer.checkpoint.gguf_quant`) come in groups of 16.

Both are pytrees (arrays are leaves), so they pass through `jax.jit` and `jax.tree.map`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

INT8_MAX = 127
INT4_LEVELS = 15
INT4_ZERO = 8
# Largest |q - 8| the symmetric int4 quantizer uses, so every weight is within half a step.
INT4_SYMMETRIC_MAX = 7


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Weights:
    """int8 values with one float32 scale per (output row, group of input columns)."""

    values: jax.Array  # [N, K] int8
    scales: jax.Array  # [N, K // G] float32

    @property
    def shape(self) -> tuple[int, int]:
        """The dense weight's shape `(N, K)`."""
        return tuple(self.values.shape)

    @property
    def group_size(self) -> int:
        """Input columns sharing one scale (`K` when there is one scale per output channel)."""
        return self.values.shape[1] // self.scales.shape[1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int4Weights:
    """Half-split packed 4-bit values with float32 scales and optional mins (asymmetric)."""

    packed: jax.Array  # [N, K // 2] uint8
    scales: jax.Array  # [N, K // G] float32
    mins: jax.Array | None = None  # [N, K // G] float32, or None for symmetric weights

    @property
    def shape(self) -> tuple[int, int]:
        """The dense weight's shape `(N, K)`."""
        return (self.packed.shape[0], 2 * self.packed.shape[1])

    @property
    def group_size(self) -> int:
        """Input columns sharing one scale (and min)."""
        return self.shape[1] // self.scales.shape[1]

    @property
    def symmetric(self) -> bool:
        """True when `w = (q - 8) * scale`, False when `w = q * scale + min`."""
        return self.mins is None


QuantizedWeights = Int8Weights | Int4Weights


def _grouped(w: jax.Array, group_size: int) -> jax.Array:
    """`w` [N, K] float -> [N, K // group_size, group_size] float32."""
    rows, cols = w.shape
    if group_size <= 0 or cols % group_size:
        raise ValueError(f"group_size {group_size} must be positive and divide K = {cols}")
    return w.astype(jnp.float32).reshape(rows, cols // group_size, group_size)


def _safe_divide(values: jax.Array, steps: jax.Array) -> jax.Array:
    """values / steps, with a zero step (a constant group) dividing by 1 instead."""
    return values / jnp.where(steps == 0, 1.0, steps)


def _expand(per_group: jax.Array, group_size: int) -> jax.Array:
    """`per_group` [N, K // G] -> [N, K], each group's value repeated over its columns."""
    return jnp.repeat(per_group, group_size, axis=1)


def quantize_int8(w: jax.Array, group_size: int | None = None) -> Int8Weights:
    """Symmetric int8 quantization of `w` [N, K] with absmax scales; `group_size` None means K."""
    group_size = w.shape[1] if group_size is None else group_size
    grouped = _grouped(w, group_size)
    scales = jnp.max(jnp.abs(grouped), axis=-1) / INT8_MAX
    q = jnp.round(_safe_divide(grouped, scales[..., None]))
    values = jnp.clip(q, -INT8_MAX, INT8_MAX).astype(jnp.int8).reshape(w.shape)
    return Int8Weights(values=values, scales=scales)


def pack_int4(q: jax.Array) -> jax.Array:
    """Nibbles `q` [N, K] (0..15) -> half-split packed bytes [N, K // 2] uint8."""
    half = q.shape[1] // 2
    q = q.astype(jnp.uint8)
    return q[:, :half] | (q[:, half:] << 4)


def unpack_int4(packed: jax.Array) -> jax.Array:
    """Half-split packed bytes [N, K // 2] uint8 -> nibbles [N, K] uint8 (0..15)."""
    return jnp.concatenate([packed & 0xF, packed >> 4], axis=1)


def quantize_int4(w: jax.Array, group_size: int, symmetric: bool = True) -> Int4Weights:
    """4-bit quantization of `w` [N, K], `K` even.

    Symmetric: `scale = absmax / 7`, `q = round(w / scale) + 8` in 1..15.
    Asymmetric: `min = group min`, `scale = (max - min) / 15`, `q = round((w - min) / scale)`.
    """
    if w.shape[1] % 2:
        raise ValueError(f"int4 weights need an even K, got K = {w.shape[1]}")
    grouped = _grouped(w, group_size)
    if symmetric:
        scales = jnp.max(jnp.abs(grouped), axis=-1) / INT4_SYMMETRIC_MAX
        mins = None
        q = jnp.round(_safe_divide(grouped, scales[..., None])) + INT4_ZERO
    else:
        mins = jnp.min(grouped, axis=-1)
        scales = (jnp.max(grouped, axis=-1) - mins) / INT4_LEVELS
        q = jnp.round(_safe_divide(grouped - mins[..., None], scales[..., None]))
    q = jnp.clip(q, 0, INT4_LEVELS).reshape(w.shape)
    return Int4Weights(packed=pack_int4(q), scales=scales, mins=mins)


def dequantize(weights: QuantizedWeights) -> jax.Array:
    """The dense weight [N, K] float32 that `weights` stands for."""
    group_size = weights.group_size
    scales = _expand(weights.scales, group_size)
    if isinstance(weights, Int8Weights):
        return weights.values.astype(jnp.float32) * scales
    q = unpack_int4(weights.packed).astype(jnp.float32)
    if weights.symmetric:
        return (q - INT4_ZERO) * scales
    return q * scales + _expand(weights.mins, group_size)
