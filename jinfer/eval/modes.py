"""The quantization modes that tools/perplexity.py and tools/bench_quantization.py compare, by name."""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
from absl import app

import jinfer


@dataclasses.dataclass(frozen=True)
class Mode:
    """How a mode holds the weights (jinfer.load keyword arguments) and the KV cache."""

    load_options: dict
    kv_cache_dtype: str = "auto"


MODES = {
    "f32": Mode({"dtype": jnp.float32}),
    "bf16": Mode({"dtype": jnp.bfloat16}),
    "int8": Mode({"dtype": jnp.float32, "quantize": "int8"}),
    "w8a8": Mode({"dtype": jnp.float32, "quantize": "w8a8"}),
    "w8a8-float-head": Mode({"dtype": jnp.float32, "quantize": "w8a8", "quantize_lm_head": False}),
    "int4-g32": Mode({"dtype": jnp.float32, "quantize": "int4", "group_size": 32}),
    "int4-g64": Mode({"dtype": jnp.float32, "quantize": "int4", "group_size": 64}),
    "int4-g128": Mode({"dtype": jnp.float32, "quantize": "int4", "group_size": 128}),
    "w4a8-g32": Mode({"dtype": jnp.float32, "quantize": "w4a8", "group_size": 32}),
    "w4a16-g32": Mode({"dtype": jnp.float32, "quantize": "w4a16", "group_size": 32}),
    "gguf": Mode({"dtype": jnp.float32, "quantize": "gguf"}),
    "int8-kv": Mode({"dtype": jnp.float32}, "int8"),
    "int8+int8-kv": Mode({"dtype": jnp.float32, "quantize": "int8"}, "int8"),
    "w8a8+int8-kv": Mode({"dtype": jnp.float32, "quantize": "w8a8"}, "int8"),
}


def check_modes(names: list[str]) -> None:
    unknown = [name for name in names if name not in MODES]
    if unknown:
        raise ValueError(f"unknown modes {unknown}; supported: {', '.join(MODES)}")


def check_modes_flag(names: list[str]) -> None:
    """check_modes for a tool's --modes flag: an unknown mode is a usage error."""
    try:
        check_modes(names)
    except ValueError as error:
        raise app.UsageError(str(error)) from error


def load_mode(path: str | os.PathLike, name: str) -> jinfer.Model:
    """The model at `path` loaded as mode `name` holds its weights (its KV cache dtype: MODES[name])."""
    check_modes([name])
    return jinfer.load(path, **MODES[name].load_options)
