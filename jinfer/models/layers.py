"""Building blocks of a decoder: linear maps with logical axes, RMSNorm, rotary embedding, gated MLP."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jinfer import native
from jinfer.config import ModelConfig, RopeConfig
from jinfer.ops import backend as kernel_backend
from jinfer.ops.matmul import dense_matmul, quantized_matmul
from jinfer.quantize import is_quantized

DType = Any
INIT_STDDEV = 0.02


class Linear(nn.Module):
    """y = x · kernel (+ bias), contracting the trailing `len(in_features)` axes of x.

    `axes` names the logical axes of (*in_features, *out_features). The kernel is stored
    `[*out_features, *in_features]`, the layout of HF checkpoints, and multiplied as a 2-D
    `[fan_out, fan_in]` matrix: XLA:CPU runs matrix-vector products (decode) several times faster
    with the contraction on the weight's minor axis, and ten times faster for 2-D than for
    multi-axis dots, which it does not hand to its matmul library.
    """

    in_features: tuple[int, ...]
    out_features: tuple[int, ...]
    axes: tuple[str, ...]
    use_bias: bool = False
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x):  # x: [*lead, *in_features] -> [*lead, *out_features]
        n_in, n_out = len(self.in_features), len(self.out_features)
        in_axes, out_axes = self.axes[:n_in], self.axes[n_in:]
        lead = x.shape[: x.ndim - n_in]
        fan_in, fan_out = math.prod(self.in_features), math.prod(self.out_features)
        stored = None if self.is_initializing() else self.get_variable("params", "kernel")
        if is_quantized(stored):  # from jinfer.quantize, already [fan_out, fan_in]
            y = quantized_matmul(x.reshape(-1, fan_in), stored).astype(jnp.float32)
        else:
            kernel = self.param(
                "kernel",
                nn.with_logical_partitioning(nn.initializers.normal(INIT_STDDEV), out_axes + in_axes),
                self.out_features + self.in_features,
                self.dtype,
            )
            y = dense_matmul(x.reshape(-1, fan_in), kernel.reshape(fan_out, fan_in))
        y = y.reshape(*lead, *self.out_features).astype(self.dtype)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, out_axes), self.out_features, self.dtype)
            y = y + bias
        return y


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + scale), computed in float32. Gemma stores `scale - 1` (offset 1). In
    kernel mode "native" (the enclosing `kernel_scope`'s) float32 rows run jinfer's CPU kernel."""

    features: int
    eps: float
    offset: float = 0.0
    axis_name: str = "embed"
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x):  # x: [..., features]
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param("scale", nn.with_logical_partitioning(init, (self.axis_name,)), (self.features,), self.dtype)
        x32 = x.astype(jnp.float32)
        if kernel_backend.resolve() == "native" and native.supports_rms_norm(x32, scale):
            return native.rms_norm(x32, scale, self.eps, self.offset)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (normed * (self.offset + scale.astype(jnp.float32))).astype(self.dtype)
        return scale * normed.astype(self.dtype)


def rope_inverse_frequencies(rope: RopeConfig, rotary_dim: int) -> np.ndarray:
    """[rotary_dim // 2] float32 angular frequencies, with llama3 / linear context scaling applied."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / rotary_dim
    inv_freq = (1.0 / (rope.theta**exponents)).astype(np.float32)
    if rope.rope_type == "linear":
        return inv_freq / np.float32(rope.factor)
    if rope.rope_type == "llama3":
        wavelength = 2 * np.pi / inv_freq
        context = rope.original_max_position_embeddings
        long_wavelength = context / rope.low_freq_factor
        short_wavelength = context / rope.high_freq_factor
        scaled = np.where(wavelength > long_wavelength, inv_freq / rope.factor, inv_freq)
        blend = (context / wavelength - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        blended = (1 - blend) * scaled / rope.factor + blend * scaled
        in_between = (wavelength >= short_wavelength) & (wavelength <= long_wavelength)
        return np.where(in_between, blended, scaled).astype(np.float32)
    return inv_freq


def rope_tables(positions, rope: RopeConfig, rotary_dim: int, dtype: DType):
    """positions: [*lead] int -> (cos, sin), each [*lead, rotary_dim] in `dtype` (halves repeated).

    Computed once and shared by every layer. The tables come out of a conditional whose two branches
    are the same computation: XLA does not fuse across a conditional, so the tables are materialized.
    Without it XLA:CPU fuses cos and sin into each layer's rotation and evaluates them again for every
    head (~5% of a batch-32 decode step); an optimization barrier does not stop it (the CPU pipeline
    removes barriers before fusion).
    """
    inv_freq = jnp.asarray(rope_inverse_frequencies(rope, rotary_dim))

    def tables(positions):
        angles = positions.astype(jnp.float32)[..., None] * inv_freq
        angles = jnp.concatenate([angles, angles], axis=-1)
        return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)

    return lax.cond(jnp.any(positions < 0), tables, tables, positions)


def apply_rope(x, cos, sin):
    """x: [*lead, heads, head_dim]; cos, sin: [*lead, head_dim]. Rotates the two halves of head_dim."""
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return x * cos[..., None, :] + rotated * sin[..., None, :]


ACTIVATION_FNS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU for Llama/Qwen/Mistral, GeGLU for Gemma."""

    config: ModelConfig
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x):  # x: [*lead, embed]
        cfg = self.config
        hidden, inner = (cfg.hidden_size,), (cfg.intermediate_size,)
        gate = Linear(hidden, inner, ("embed", "mlp"), dtype=self.dtype, name="gate_proj")(x)
        up = Linear(hidden, inner, ("embed", "mlp"), dtype=self.dtype, name="up_proj")(x)
        return Linear(inner, hidden, ("mlp", "embed"), dtype=self.dtype, name="down_proj")(ACTIVATION_FNS[cfg.activation](gate) * up)
