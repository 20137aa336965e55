"""Hugging Face tensor names -> jinfer parameters, one tensor at a time (layouts differ only by reshapes)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

import flax.linen as nn
import jax
import numpy as np
from tqdm import tqdm

from jinfer.config import ModelConfig
from pallas_kernels.quantized_matmul import QuantizedWeights


class CheckpointSource(Protocol):
    """A checkpoint seen through HF names: safetensors directories and GGUF files both provide this."""

    def hf_config(self) -> dict: ...
    def tensor_names(self) -> list[str]: ...
    def tensor(self, name: str) -> np.ndarray: ...


def _norm_names(config: ModelConfig) -> dict[str, str]:
    if config.sandwich_norms:
        return {
            "attn_norm": "input_layernorm",
            "attn_post_norm": "post_attention_layernorm",
            "mlp_norm": "pre_feedforward_layernorm",
            "mlp_post_norm": "post_feedforward_layernorm",
        }
    return {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}


def _module_names(config: ModelConfig) -> dict[str, str]:
    names = {"attn": "self_attn", **_norm_names(config)}
    if config.architecture == "mixtral":
        names["mlp"] = "block_sparse_moe"
    return names


# Mixtral's names for an expert's gate, down and up projections.
_MIXTRAL_EXPERT_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def hf_tensor_name(path: tuple[str, ...], config: ModelConfig) -> str:
    """('layer_3', 'attn', 'q_proj', 'kernel') -> 'model.layers.3.self_attn.q_proj.weight'."""
    if path == ("embedding",):
        return "model.embed_tokens.weight"
    top, *modules, leaf = path
    if top == "final_norm":
        return "model.norm.weight"
    if top == "lm_head":
        return "lm_head.weight"
    module_names = _module_names(config)
    parts = ["model", "layers", top.removeprefix("layer_")] + [module_names.get(m, m) for m in modules]
    return ".".join(parts + ["weight" if leaf in ("kernel", "scale") else leaf])


def is_stacked_experts(path: tuple[str, ...]) -> bool:
    """Whether the parameter stacks one HF tensor per expert: ('layer_3', 'mlp', 'experts', 'gate_proj')."""
    return len(path) > 1 and path[-2] == "experts"


def hf_expert_tensor_names(path: tuple[str, ...], config: ModelConfig) -> list[str]:
    """('layer_3', 'mlp', 'experts', 'gate_proj') -> one name per expert, in expert order:
    'model.layers.3.mlp.experts.{e}.gate_proj.weight' (Mixtral: 'block_sparse_moe.experts.{e}.w1.weight')."""
    top, mlp, _, projection = path
    if config.architecture == "mixtral":
        projection = _MIXTRAL_EXPERT_NAMES[projection]
    prefix = f"model.layers.{top.removeprefix('layer_')}.{_module_names(config).get(mlp, mlp)}.experts"
    return [f"{prefix}.{e}.{projection}.weight" for e in range(config.num_experts)]


def hf_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF shape of a jinfer parameter. Kernels are HF's [out, in] with the head axes split
    out (q: [heads, head_dim, embed]; o: [embed, heads, head_dim]), so loading is a reshape."""
    if path[-1] == "kernel":
        num_in = 2 if path[-2] == "o_proj" else 1
        return (int(np.prod(shape[:-num_in])), int(np.prod(shape[-num_in:])))
    if path[-1] == "bias":
        return (int(np.prod(shape)),)
    return tuple(shape)


def _key_names(path) -> tuple[str, ...]:
    return tuple(k.key for k in path)


def load_params(
    source: CheckpointSource,
    abstract_params,
    config: ModelConfig,
    place: Callable[[tuple[str, ...], np.ndarray], jax.Array],
    *,
    source_name: str,
    read_quantized: Callable[[tuple[str, ...], str, tuple[int, ...]], QuantizedWeights | None] | None = None,
):
    """Fills `abstract_params` (annotated ShapeDtypeStructs from `eval_shape`) from `source`.

    Tensors are read, laid out, cast and placed one at a time by `place(path, array)`, so host
    memory stays near the size of the largest tensor on top of the placed model.
    `read_quantized(path, hf_name, hf_shape)`, where given, may return a parameter's quantized
    layout instead (placed leaf by leaf, never read as float); None reads it as float.
    """
    available = set(source.tensor_names())
    flat, treedef = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params))
    leaves = []
    for key_path, spec in tqdm(flat, desc=f"loading {source_name}", unit="tensor", leave=False):
        path = _key_names(key_path)
        quantized = None
        if read_quantized is not None and not is_stacked_experts(path) and hf_tensor_name(path, config) in available:
            quantized = read_quantized(path, hf_tensor_name(path, config), hf_shape(path, spec.shape))
        if quantized is not None:
            leaves.append(jax.tree.map(functools.partial(place, path), quantized))
            continue
        if is_stacked_experts(path):
            array = _read_stacked(source, hf_expert_tensor_names(path, config), spec, available, source_name)
        else:
            name = hf_tensor_name(path, config)
            array = _read(source, name, hf_shape(path, spec.shape), available, source_name).reshape(spec.shape)
        leaves.append(place(path, array.astype(spec.dtype, copy=False)))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _read(source: CheckpointSource, name: str, expected: tuple[int, ...], available: set[str], source_name: str) -> np.ndarray:
    """The HF tensor `name`, checked to exist and to have the shape `expected`."""
    if name not in available:
        raise KeyError(f"tensor {name!r} is missing from checkpoint {source_name!r}")
    hf_array = source.tensor(name)
    if tuple(hf_array.shape) != expected:
        raise ValueError(f"tensor {name!r} in {source_name!r} has shape {tuple(hf_array.shape)}, expected {expected}")
    return hf_array


def _read_stacked(source: CheckpointSource, names: list[str], spec, available: set[str], source_name: str) -> np.ndarray:
    """One HF tensor per expert, copied one at a time into a host array of `spec`'s [experts, *rest] shape."""
    stacked = np.empty(spec.shape, spec.dtype)
    for expert, name in enumerate(names):
        stacked[expert] = _read(source, name, tuple(spec.shape[1:]), available, source_name)
    return stacked
