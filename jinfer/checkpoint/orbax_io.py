"""Orbax checkpoints of jinfer parameters: saved as a plain pytree, restored into given shardings."""

from __future__ import annotations

import json
import os
import pathlib

import jax
import orbax.checkpoint as ocp

from jinfer.config import ModelConfig, config_from_dict, config_to_dict

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
FORMAT_TAG = "jinfer"


def is_orbax_checkpoint(path: pathlib.Path) -> bool:
    return (path / PARAMS_DIR).is_dir() and (path / CONFIG_FILE).is_file()


def save(directory: str | os.PathLike, params, config: ModelConfig) -> pathlib.Path:
    """Writes `<dir>/params` (Orbax) and `<dir>/config.json` (jinfer's ModelConfig, tagged)."""
    directory = pathlib.Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / PARAMS_DIR, params, force=True)
    (directory / CONFIG_FILE).write_text(json.dumps({"format": FORMAT_TAG, **config_to_dict(config)}, indent=2))
    return directory


def read_config(directory: pathlib.Path) -> ModelConfig:
    data = json.loads((directory / CONFIG_FILE).read_text())
    if data.get("format") != FORMAT_TAG:
        raise ValueError(f"{str(directory / CONFIG_FILE)!r} is not a jinfer checkpoint config")
    return config_from_dict(data)


def restore(directory: pathlib.Path, abstract_params, shardings):
    """Reads each array straight into its target sharding: no full host copy of the model."""
    target = jax.tree.map(
        lambda spec, sharding: jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=sharding), abstract_params, shardings
    )
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(pathlib.Path(directory).resolve() / PARAMS_DIR, target)
