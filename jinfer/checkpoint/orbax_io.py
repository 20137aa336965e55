"""Orbax checkpoints of jinfer parameters: saved as a plain pytree, restored into given shardings.

Orbax is imported on first use: a start that reads its model from the model cache never needs it
(its import alone is ~0.25 s of a warm start)."""

from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp
from flax import traverse_util

from jinfer.config import ModelConfig, config_from_dict, config_to_dict

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
FORMAT_TAG = "jinfer"
QUANTIZATION_KEY = "quantization"


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def is_orbax_checkpoint(path: pathlib.Path) -> bool:
    return (path / PARAMS_DIR).is_dir() and (path / CONFIG_FILE).is_file()


def save(directory: str | os.PathLike, params, config: ModelConfig, quantization: dict | None = None) -> pathlib.Path:
    """Writes `<dir>/params` (Orbax) and `<dir>/config.json` (jinfer's ModelConfig, tagged, with the
    `quantization` record of a quantized tree, see `jinfer.quantize.quantization_record`)."""
    directory = pathlib.Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    with _checkpointer() as checkpointer:
        checkpointer.save(directory / PARAMS_DIR, params, force=True)
    record = {} if quantization is None else {QUANTIZATION_KEY: quantization}
    (directory / CONFIG_FILE).write_text(json.dumps({"format": FORMAT_TAG, **config_to_dict(config), **record}, indent=2))
    return directory


def _read_tagged(directory: pathlib.Path) -> dict:
    data = json.loads((directory / CONFIG_FILE).read_text())
    if data.get("format") != FORMAT_TAG:
        raise ValueError(f"{str(directory / CONFIG_FILE)!r} is not a jinfer checkpoint config")
    return data


def read_config(directory: pathlib.Path) -> ModelConfig:
    return config_from_dict(_read_tagged(directory))


def read_quantization(directory: pathlib.Path) -> dict | None:
    """The quantization record of a quantized checkpoint, None for a float one."""
    return _read_tagged(directory).get(QUANTIZATION_KEY)


def _stored_arrays(directory: pathlib.Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """'layer_0/attn/q_proj/kernel/values' -> (shape, dtype name) of every array in the checkpoint."""
    with _checkpointer() as checkpointer:
        tree = checkpointer.metadata(directory / PARAMS_DIR).item_metadata.tree
    flat = traverse_util.flatten_dict(tree, sep="/")
    return {name: (tuple(meta.shape), str(meta.dtype)) for name, meta in flat.items() if meta is not None}


def _key_name(key) -> str:
    return str(getattr(key, "key", getattr(key, "name", key)))


def check_matches(directory: pathlib.Path, abstract_params) -> None:
    """Raises ValueError naming the first tensor whose stored shape (or integer dtype) differs from what the
    checkpoint's config makes the model expect (`abstract_params`: ShapeDtypeStructs), or that is
    missing / not expected, before Orbax reads anything."""
    stored = _stored_arrays(pathlib.Path(directory).resolve())
    expected = {
        "/".join(_key_name(k) for k in path): (tuple(spec.shape), str(jnp.dtype(spec.dtype)))
        for path, spec in jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    }
    for name, (shape, dtype) in expected.items():
        if name not in stored:
            raise ValueError(f"{directory}: tensor {name!r} ({dtype} {shape}) that its config.json implies is not in the checkpoint")
        (stored_shape, stored_dtype) = stored[name]
        # Float arrays are cast to the load dtype on restore; integer codes must match exactly.
        integer = any(jnp.issubdtype(d, jnp.integer) for d in (stored_dtype, dtype))
        if stored_shape != shape or (integer and stored_dtype != dtype):
            raise ValueError(
                f"{directory}: tensor {name!r} is stored as {stored[name][1]} {stored[name][0]} but its config.json implies {dtype} {shape}"
            )
    extra = sorted(set(stored) - set(expected))
    if extra:
        raise ValueError(f"{directory}: tensor {extra[0]!r} is in the checkpoint but not in the model its config.json describes")


def restore(directory: pathlib.Path, abstract_params, shardings):
    """Reads each array straight into its target sharding: no full host copy of the model.
    Checks every stored shape and dtype first (`check_matches`)."""
    check_matches(directory, abstract_params)
    target = jax.tree.map(
        lambda spec, sharding: jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=sharding), abstract_params, shardings
    )
    with _checkpointer() as checkpointer:
        return checkpointer.restore(pathlib.Path(directory).resolve() / PARAMS_DIR, target)
