"""Weight-only quantization of a loaded model's linear layers (int8 per channel or grouped, int4 grouped).

Each quantized kernel replaces its float `[*out, *in]` array in the parameter tree by an
`Int8Weights` / `Int4Weights` of the 2-D `[fan_out, fan_in]` matrix the layer multiplies by
(pallas_kernels/quantized_matmul/layout.py); `Linear` runs those through `jinfer.ops.matmul`.
The embedding (and with it a tied LM head), norms, biases and MoE experts stay in float.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import traverse_util

from pallas_kernels.quantized_matmul import quantize_int4, quantize_int8

MODES = ("int8", "int4")
# Linear layers whose kernel has more than one input axis: o_proj contracts (heads, head_dim).
INPUT_AXES = {"o_proj": 2}
QUANTIZED_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def check_mode(mode: str | None, group_size: int | None) -> None:
    """Raises ValueError naming the bad value; mode None means no quantization."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"quantize={mode!r} is not one of {MODES}")
    if mode == "int4" and group_size is None:
        raise ValueError("int4 quantization needs a group_size (32, 64 or 128)")
    if group_size is not None and group_size not in (32, 64, 128):
        raise ValueError(f"group_size={group_size} must be 32, 64 or 128")


def quantize_params(params, mode: str, group_size: int | None = None):
    """params: a float parameter tree -> the same tree with every linear kernel quantized.

    int8 uses one scale per output channel unless `group_size` is given; int4 is asymmetric (a scale
    and a min per group of `group_size`, as GGUF's Q4_1), which keeps a lopsided group's range. A group size that does not divide a layer's input raises ValueError
    naming the layer.
    """
    check_mode(mode, group_size)
    flat = traverse_util.flatten_dict(params)
    for path, kernel in flat.items():
        layer = path[-2] if len(path) >= 2 else ""
        if path[-1] != "kernel" or layer not in QUANTIZED_LAYERS or "experts" in path:
            continue
        flat[path] = _quantized(kernel, INPUT_AXES.get(layer, 1), mode, group_size, "/".join(path))
    return traverse_util.unflatten_dict(flat)


def _quantized(kernel, input_axes: int, mode: str, group_size: int | None, name: str):
    """kernel: [*out, *in] float -> Int8Weights / Int4Weights of the [fan_out, fan_in] matrix."""
    fan_in = math.prod(kernel.shape[-input_axes:])
    matrix = jnp.asarray(kernel, jnp.float32).reshape(-1, fan_in)
    if group_size is not None and fan_in % group_size:
        raise ValueError(f"{name}: group_size={group_size} does not divide its {fan_in} input features")
    if mode == "int8":
        return jax.jit(quantize_int8, static_argnums=1)(matrix, group_size)
    return jax.jit(quantize_int4, static_argnums=(1, 2))(matrix, group_size, False)
