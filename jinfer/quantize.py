"""Weight-only quantization of a model's linear layers (int8 per channel or grouped, int4 grouped),
and the record of a quantized parameter tree that a quantized checkpoint keeps beside its arrays.

Each quantized kernel replaces its float `[*out, *in]` array in the parameter tree by an
`Int8Weights` / `Int4Weights` of the 2-D `[fan_out, fan_in]` matrix the layer multiplies by
(pallas_kernels/quantized_matmul/layout.py); `Linear` runs those through `jinfer.ops.matmul`.
Norms, biases, MoE experts and the embedding lookup stay in float. The LM head is quantized
unless `lm_head=False`: an untied `lm_head` like any linear layer; a head tied to the embedding
gets a quantized copy of the embedding matrix (`tied_lm_head`) beside the float rows the lookup
reads, since decode reads the whole head every token but only one embedding row per token.

Modes: "int8" and "int4" quantize float weights after loading; "gguf" keeps a GGUF file's
quantized blocks as they are (`jinfer.checkpoint.gguf_quant`), with no float detour; "w8a8" stores
int8 weights with one scale per output channel as `DynamicInt8Weights`, whose XLA matmul also
quantizes the activations, per row, to int8 and multiplies int8 x int8 into int32
(`jinfer.ops.matmul`): XLA:CPU hands that product to its int8 GEMM, several times faster than the
dequantize-then-float-dot of weight-only int8. "w4a8" stores asymmetric int4 weights in groups of
`group_size` as `PanelInt4Weights`, in panels of 8 rows for jinfer's CPU kernel, whose matmul rounds the
activations to int8 per block of 32 columns and multiplies 4-bit by 8-bit integers (as llama.cpp
multiplies its 4-bit blocks by 8-bit activations); "w4a16" rounds them to 16 bits per block (two
int8 parts, within 1/65,000 of the block's largest value) and multiplies each part. All three change
the model's outputs (the activations are rounded), which the perplexity table measures.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pallas_kernels.quantized_matmul import Int4Weights, Int8Weights, QuantizedWeights, quantize_int4, quantize_int8

GGUF = "gguf"
W8A8 = "w8a8"
W4A8 = "w4a8"
W4A16 = "w4a16"
PANEL_MODES = {W4A8: 8, W4A16: 16}  # mode -> bits the activations are rounded to
MODES = ("int8", "int4", GGUF, W8A8, W4A8, W4A16)
GROUP_SIZES = (32, 64, 128)
# Linear layers whose kernel has more than one input axis: o_proj contracts (heads, head_dim).
INPUT_AXES = {"o_proj": 2}
TIED_LM_HEAD = "tied_lm_head"  # top-level params entry: the quantized copy of a tied embedding that the LM head multiplies by
QUANTIZED_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", TIED_LM_HEAD)


def check_mode(mode: str | None, group_size: int | None) -> None:
    """Raises ValueError naming the bad value; mode None means no quantization."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"quantize={mode!r} is not one of {MODES}")
    if mode in ("int4", *PANEL_MODES) and group_size is None:
        raise ValueError(f"{mode} quantization needs a group_size (32, 64 or 128)")
    if mode == GGUF and group_size is not None:
        raise ValueError(f"quantize='gguf' keeps the file's own groups; group_size={group_size} does not apply")
    if mode == W8A8 and group_size is not None:
        raise ValueError(f"quantize='w8a8' has one scale per output channel; group_size={group_size} does not apply")
    if group_size is not None and group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size} must be 32, 64 or 128")


def is_quantizable(path: tuple[str, ...]) -> bool:
    """Whether the parameter at `path` (e.g. ('layer_0', 'attn', 'q_proj', 'kernel')) is a linear
    kernel that the quantized modes store as int8 / int4."""
    return len(path) >= 2 and path[-1] == "kernel" and path[-2] in QUANTIZED_LAYERS and "experts" not in path


def matrix_shape(path: tuple[str, ...], kernel_shape: tuple[int, ...]) -> tuple[int, int]:
    """The [fan_out, fan_in] matrix a linear kernel of shape [*out, *in] is multiplied as."""
    input_axes = INPUT_AXES.get(path[-2], 1)
    return math.prod(kernel_shape[:-input_axes]), math.prod(kernel_shape[-input_axes:])


def quantize_params(params, mode: str, group_size: int | None = None, lm_head: bool = True):
    """params: a float parameter tree -> the same tree with every linear kernel quantized, the LM
    head too unless `lm_head` is False (`with_tied_lm_head` for a head tied to the embedding).

    int8 uses one scale per output channel unless `group_size` is given; int4 is asymmetric (a scale
    and a min per group of `group_size`, as GGUF's Q4_1), which keeps a lopsided group's range. A
    group size that does not divide a layer's input raises ValueError naming the layer.
    """
    check_mode(mode, group_size)
    if mode == GGUF:
        raise ValueError("quantize='gguf' reads a GGUF file's quantized blocks as stored; it cannot quantize float weights")
    flat = traverse_util.flatten_dict(params)
    for path, kernel in flat.items():
        if is_quantizable(path) and (lm_head or path[-2] != "lm_head"):
            flat[path] = _quantized(kernel, matrix_shape(path, kernel.shape), mode, group_size, "/".join(path))
    params = traverse_util.unflatten_dict(flat)
    return with_tied_lm_head(params, mode, group_size) if lm_head else params


def ties_lm_head(params) -> bool:
    """Whether a parameter tree's LM head is its embedding (no `lm_head` entry of its own)."""
    return "embedding" in params and "lm_head" not in params


def with_tied_lm_head(params, mode: str, group_size: int | None = None):
    """params with a `tied_lm_head` kernel, the embedding [V, E] quantized in `mode`, when the model
    ties its LM head to the embedding (no `lm_head` entry); otherwise params unchanged."""
    if not ties_lm_head(params):
        return params
    embedding = params["embedding"]
    return {**params, TIED_LM_HEAD: {"kernel": _quantized(embedding, embedding.shape, mode, group_size, "embedding (tied LM head)")}}


def _quantized(kernel, shape: tuple[int, int], mode: str, group_size: int | None, name: str):
    """kernel: [*out, *in] float -> Int8Weights / Int4Weights of the `shape` = [fan_out, fan_in] matrix."""
    matrix = jnp.asarray(kernel, jnp.float32).reshape(shape)
    if group_size is not None and shape[1] % group_size:
        raise ValueError(f"{name}: group_size={group_size} does not divide its {shape[1]} input features")
    if mode == "int8":
        return jax.jit(quantize_int8, static_argnums=1)(matrix, group_size)
    if mode == W8A8:
        weights = jax.jit(quantize_int8)(matrix)
        return DynamicInt8Weights(values=weights.values, scales=weights.scales)
    weights = jax.jit(quantize_int4, static_argnums=(1, 2))(matrix, group_size, False)
    if mode in PANEL_MODES:
        if shape[0] % PANEL_ROWS:
            raise ValueError(f"{name}: quantize={mode!r} stores panels of {PANEL_ROWS} rows; its {shape[0]} output features are not a multiple")
        return PanelInt4Weights.from_int4(weights, PANEL_MODES[mode])
    return weights


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DynamicInt8Weights(Int8Weights):
    """Int8Weights with one scale per output channel (`scales` [N, 1]) whose XLA matmul quantizes the
    activations too (quantize="w8a8"); the Pallas kernels multiply them as plain int8 weights."""


PANEL_ROWS = 8  # weight rows per panel of PanelInt4Weights
ACTIVATION_BLOCK = 32  # columns of x sharing one scale when PanelInt4Weights' products round x
PANEL_CHUNK = 4  # bytes of a row per chunk of PanelInt4Weights' packed panels


def interleave_panels(a, chunk: int):
    """a: [N, C] -> [N, C]: in each panel of 8 rows, chunk 0 of rows 0..7, then chunk 1 of rows 0..7, ...
    (N % 8 == 0, C % chunk == 0)."""
    n, c = a.shape
    return a.reshape(n // PANEL_ROWS, PANEL_ROWS, c // chunk, chunk).transpose(0, 2, 1, 3).reshape(n, c)


def deinterleave_panels(a, chunk: int):
    """The inverse of `interleave_panels`: a: [N, C] in panels -> [N, C] in rows."""
    n, c = a.shape
    return a.reshape(n // PANEL_ROWS, c // chunk, PANEL_ROWS, chunk).transpose(0, 2, 1, 3).reshape(n, c)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PanelInt4Weights:
    """Asymmetric int4 weights (`w = q * scale + min`) whose matmul rounds the activations to
    `activation_bits` (8: quantize="w4a8", 16: "w4a16") per block of 32 columns. The arrays are Int4Weights' (half-split nibbles, a scale
    and a min per row and group) with the rows of each panel of 8 interleaved (`interleave_panels`):
    4 bytes of row 0, of row 1, ... of row 7, then the next 4 bytes of each; the scales and mins one
    group at a time. jinfer's CPU kernel (jinfer/native/matmul_panels.cc) multiplies a panel's 8 rows
    in the 8 lanes of a vector; the other paths take `as_int4()`."""

    packed: jax.Array  # [N, K // 2] uint8, in panels
    scales: jax.Array  # [N, K // G] float32, in panels
    mins: jax.Array  # [N, K // G] float32, in panels
    activation_bits: int = dataclasses.field(metadata={"static": True})

    shape = Int4Weights.shape  # same arrays, same shapes
    group_size = Int4Weights.group_size

    @classmethod
    def from_int4(cls, weights: Int4Weights, activation_bits: int) -> "PanelInt4Weights":
        """weights: asymmetric Int4Weights of N % 8 == 0 rows."""
        return cls(
            packed=interleave_panels(weights.packed, PANEL_CHUNK),
            scales=interleave_panels(weights.scales, 1),
            mins=interleave_panels(weights.mins, 1),
            activation_bits=activation_bits,
        )

    def as_int4(self) -> Int4Weights:
        """The same weights as Int4Weights, rows in order."""
        return Int4Weights(
            packed=deinterleave_panels(self.packed, PANEL_CHUNK),
            scales=deinterleave_panels(self.scales, 1),
            mins=deinterleave_panels(self.mins, 1),
        )


def is_quantized(leaf) -> bool:
    return isinstance(leaf, (Int8Weights, Int4Weights, PanelInt4Weights))


def describe(weights: QuantizedWeights) -> dict:
    """The record of one quantized kernel: {"layout": "int8"} or {"layout": "int4", "symmetric": bool},
    with its "group_size" (None: int8 with one scale per output channel)."""
    if isinstance(weights, DynamicInt8Weights):
        return {"layout": "int8", "group_size": None, "activations": "int8"}
    if isinstance(weights, PanelInt4Weights):
        return {"layout": "int4", "group_size": weights.group_size, "symmetric": False, "activations": f"int{weights.activation_bits}"}
    if isinstance(weights, Int8Weights):
        per_channel = weights.scales.shape[1] == 1
        return {"layout": "int8", "group_size": None if per_channel else weights.group_size}
    return {"layout": "int4", "group_size": weights.group_size, "symmetric": weights.symmetric}


def quantization_record(params, mode: str, group_size: int | None) -> dict:
    """What a quantized checkpoint stores in its config.json: the mode it was made with and each
    quantized kernel's layout, by parameter path ("layer_0/attn/q_proj/kernel")."""
    flat = traverse_util.flatten_dict(params)
    tensors = {"/".join(path): describe(leaf) for path, leaf in flat.items() if is_quantized(leaf)}
    return {"mode": mode, "group_size": group_size, "tensors": tensors}


def _abstract_layout(name: str, shape: tuple[int, int], entry: dict):
    """ShapeDtypeStructs of the layout `entry` (from `describe`) of a [N, K] = `shape` matrix."""
    rows, cols = shape
    group = entry.get("group_size")
    if group is None and entry.get("layout") == "int8":  # one scale per output channel
        group = cols
    if not isinstance(group, int) or group <= 0 or cols % group:
        raise ValueError(f"{name}: the checkpoint records group_size={group!r}, which does not divide its {cols} input features")
    scales = jax.ShapeDtypeStruct((rows, cols // group), jnp.float32)
    if entry.get("layout") == "int8":
        layout = DynamicInt8Weights if entry.get("activations") == "int8" else Int8Weights
        return layout(values=jax.ShapeDtypeStruct(shape, jnp.int8), scales=scales)
    if entry.get("layout") == "int4":
        if cols % 2:
            raise ValueError(f"{name}: int4 weights need an even number of input features, the config gives {cols}")
        mins = None if entry.get("symmetric") else scales
        activations = entry.get("activations")
        if activations is not None:
            if activations not in ("int8", "int16") or entry.get("symmetric") or rows % PANEL_ROWS:
                raise ValueError(
                    f"{name}: int4 weights with rounded activations are asymmetric, in panels of {PANEL_ROWS} rows, with int8 or "
                    f"int16 activations; the checkpoint records activations={activations!r}, symmetric={entry.get('symmetric')!r} for {rows} rows"
                )
            packed = jax.ShapeDtypeStruct((rows, cols // 2), jnp.uint8)
            return PanelInt4Weights(packed=packed, scales=scales, mins=mins, activation_bits=int(activations.removeprefix("int")))
        return Int4Weights(packed=jax.ShapeDtypeStruct((rows, cols // 2), jnp.uint8), scales=scales, mins=mins)
    raise ValueError(f"{name}: the checkpoint records layout {entry.get('layout')!r}; expected 'int8' or 'int4'")


def abstract_quantized_params(abstract_params, record: dict):
    """abstract_params: the float model's ShapeDtypeStruct tree (unboxed) -> the tree a checkpoint
    with `record` (from `quantization_record`) holds: recorded kernels as layouts of ShapeDtypeStructs.

    Raises ValueError naming the tensor when the record names a parameter the model does not have
    or one that is not a linear kernel.
    """
    flat = traverse_util.flatten_dict(abstract_params)
    if ties_lm_head(abstract_params) and f"{TIED_LM_HEAD}/kernel" in record["tensors"]:
        flat[(TIED_LM_HEAD, "kernel")] = abstract_params["embedding"]
    by_name = {"/".join(path): path for path in flat}
    for name, entry in record["tensors"].items():
        path = by_name.get(name)
        if path is None or not is_quantizable(path):
            raise ValueError(f"the checkpoint records quantized tensor {name!r}, which is not a linear kernel of this model's config")
        flat[path] = _abstract_layout(name, matrix_shape(path, flat[path].shape), entry)
    return traverse_util.unflatten_dict(flat)


def parameter_bytes(abstract_params) -> int:
    """Bytes of a parameter tree (arrays or ShapeDtypeStructs, quantized layouts included)."""
    return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(abstract_params))


def abstract_quantized_like(abstract_params, mode: str | None, group_size: int | None = None, lm_head: bool = True):
    """The ShapeDtypeStruct tree of the float `abstract_params` (e.g. from `jax.eval_shape`) quantized
    in `mode` (None: as is) as `quantize_params` would, from shapes alone: nothing is allocated or
    traced, so it serves models of any size."""
    if mode is None:
        return abstract_params
    check_mode(mode, group_size)
    if mode == GGUF:
        raise ValueError("quantize='gguf' layouts come from the file's tensor types; load the file to see them")
    entry = {
        "int8": {"layout": "int8", "group_size": group_size},
        W8A8: {"layout": "int8", "group_size": None, "activations": "int8"},
        "int4": {"layout": "int4", "group_size": group_size, "symmetric": False},
        W4A8: {"layout": "int4", "group_size": group_size, "symmetric": False, "activations": "int8"},
        W4A16: {"layout": "int4", "group_size": group_size, "symmetric": False, "activations": "int16"},
    }[mode]
    paths = [path for path in traverse_util.flatten_dict(abstract_params) if is_quantizable(path) and (lm_head or path[-2] != "lm_head")]
    if lm_head and ties_lm_head(abstract_params):
        paths.append((TIED_LM_HEAD, "kernel"))
    return abstract_quantized_params(abstract_params, {"tensors": {"/".join(path): entry for path in paths}})
