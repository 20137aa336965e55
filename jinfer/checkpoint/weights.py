"""Hugging Face tensor names -> jinfer parameters, one tensor at a time (layouts differ only by reshapes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import flax.linen as nn
import jax
import numpy as np
from tqdm import tqdm

from jinfer.config import ModelConfig


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


def hf_tensor_name(path: tuple[str, ...], config: ModelConfig) -> str:
    """('layer_3', 'attn', 'q_proj', 'kernel') -> 'model.layers.3.self_attn.q_proj.weight'."""
    if path == ("embedding",):
        return "model.embed_tokens.weight"
    top, *modules, leaf = path
    if top == "final_norm":
        return "model.norm.weight"
    if top == "lm_head":
        return "lm_head.weight"
    module_names = {"attn": "self_attn", **_norm_names(config)}
    parts = ["model", "layers", top.removeprefix("layer_")] + [module_names.get(m, m) for m in modules]
    return ".".join(parts + ["weight" if leaf in ("kernel", "scale") else leaf])


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
):
    """Fills `abstract_params` (annotated ShapeDtypeStructs from `eval_shape`) from `source`.

    Tensors are read, laid out, cast and placed one at a time by `place(path, array)`, so host
    memory stays near the size of the largest tensor on top of the placed model.
    """
    available = set(source.tensor_names())
    flat, treedef = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params))
    leaves = []
    for key_path, spec in tqdm(flat, desc=f"loading {source_name}", unit="tensor", leave=False):
        path = _key_names(key_path)
        name = hf_tensor_name(path, config)
        if name not in available:
            raise KeyError(f"tensor {name!r} is missing from checkpoint {source_name!r}")
        hf_array = source.tensor(name)
        expected = hf_shape(path, spec.shape)
        if tuple(hf_array.shape) != expected:
            raise ValueError(f"tensor {name!r} in {source_name!r} has shape {tuple(hf_array.shape)}, expected {expected}")
        array = hf_array.reshape(spec.shape).astype(spec.dtype)
        leaves.append(place(path, array))
    return jax.tree_util.tree_unflatten(treedef, leaves)
