"""`jinfer.load`: a model's config, parameters and tokenizer from a checkpoint or a preset."""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from jinfer import config as config_lib
from jinfer import sharding
from jinfer.checkpoint import gguf_quant, model_cache, orbax_io
from jinfer.checkpoint.gguf import GGUFCheckpoint
from jinfer.checkpoint.safetensors_dir import SafetensorsCheckpoint
from jinfer.checkpoint.weights import load_params
from jinfer.models.transformer import Transformer
from jinfer.ops.attention import FullSequenceAttention
from jinfer.quantize import check_mode as check_quantize_mode
from jinfer.quantize import GGUF, abstract_quantized_params, quantize_params
from jinfer.tokenizer import Tokenizer

GREEDY_BUCKET = 64
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype: Any) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; supported: {sorted(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    return jnp.dtype(dtype)


def abstract_params(config: config_lib.ModelConfig, dtype=jnp.float32):
    """Shapes, dtypes and logical axes of every parameter, without allocating: `nn.LogicallyPartitioned` leaves."""
    module = Transformer(config, resolve_dtype(dtype))
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), tokens, tokens, FullSequenceAttention()))
    return variables["params"]


def count_params(config: config_lib.ModelConfig) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nn.unbox(abstract_params(config))))


def init_params(config: config_lib.ModelConfig, dtype=jnp.float32, seed: int = 0):
    """Random parameters (normal, stddev 0.02; norms at identity), as a plain pytree."""
    module = Transformer(config, resolve_dtype(dtype))
    tokens = jnp.zeros((1, 1), jnp.int32)
    return nn.unbox(module.init(jax.random.key(seed), tokens, tokens, FullSequenceAttention())["params"])


@functools.partial(jax.jit, static_argnames=("config", "dtype", "kv_cache_dtype"))
def full_forward(params, tokens, *, config, dtype, kv_cache_dtype: str = "auto"):
    """tokens: [B, S] int32 -> float32 logits [B, S, vocab], every sequence starting at position 0.
    `kv_cache_dtype="int8"`: K/V rounded as the int8 KV cache stores them (FullSequenceAttention)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, _ = Transformer(config, dtype).apply({"params": params}, tokens, positions, FullSequenceAttention(kv_cache_dtype))
    return logits


def check_vocabulary(token_ids: np.ndarray, vocab_size: int) -> None:
    """token_ids: integer array of any shape; raises ValueError naming the first id outside the vocabulary."""
    bad = token_ids[(token_ids < 0) | (token_ids >= vocab_size)]
    if bad.size:
        raise ValueError(f"token id {int(bad[0])} is out of the vocabulary (size {vocab_size})")


@dataclasses.dataclass
class Model:
    """A loaded model: frozen config, plain parameter pytree, tokenizer (None for a bare preset)."""

    config: config_lib.ModelConfig
    params: Any
    tokenizer: Tokenizer | None
    dtype: jnp.dtype
    mesh: Mesh | None = None

    def logits(self, token_ids) -> np.ndarray:
        """token_ids: [batch, seq] ints -> float32 logits [batch, seq, vocab]."""
        tokens = np.asarray(token_ids)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"token_ids must be a [batch, seq] integer array, got shape {tokens.shape} dtype {tokens.dtype}")
        check_vocabulary(tokens, self.config.vocab_size)
        return np.asarray(full_forward(self.params, jnp.asarray(tokens, jnp.int32), config=self.config, dtype=self.dtype))

    def greedy_continuation(self, prompt_ids: list[int], max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
        """Greedy tokens after `prompt_ids`, one full-sequence forward per token.

        The sequence is right-padded to a multiple of GREEDY_BUCKET so one compiled forward
        serves many lengths; causal attention keeps the padding from touching real positions.
        """
        if not prompt_ids:
            raise ValueError("prompt_ids is empty: a continuation needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
        tokens = list(prompt_ids)
        for _ in range(max_new_tokens):
            length = -(-len(tokens) // GREEDY_BUCKET) * GREEDY_BUCKET
            padded = np.zeros((1, length), np.int64)
            padded[0, : len(tokens)] = tokens
            next_token = int(np.argmax(self.logits(padded)[0, len(tokens) - 1]))
            tokens.append(next_token)
            if next_token in stop_ids:
                break
        return tokens[len(prompt_ids) :]


def param_shardings(annotated, mesh: Mesh | None):
    """Where each parameter lives: device 0 without a mesh, else by the logical-axis rules."""
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: device, nn.unbox(annotated))
    return sharding.logical_shardings(annotated, mesh)


def _placer(shardings, may_alias: bool | None = None):
    """place(path, host_array) -> the array on device(s), by its parameter path (`may_alias` as in
    jax.device_put: False for host arrays that are views of a mapped file)."""
    by_path = {tuple(k.key for k in p): s for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    return lambda path, array: jax.device_put(array, by_path[path], may_alias=may_alias)


def _open_source(path: pathlib.Path):
    """The checkpoint reader for a path, or None for a jinfer Orbax checkpoint."""
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"unsupported checkpoint file {str(path)!r}: expected a .gguf file or a checkpoint directory")
        return GGUFCheckpoint(path)
    if orbax_io.is_orbax_checkpoint(path):
        return None
    return SafetensorsCheckpoint(path)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def _tokenizer_for(path: pathlib.Path, source) -> Tokenizer | None:
    if isinstance(source, GGUFCheckpoint):
        return Tokenizer.from_gguf_metadata(source.metadata, source=str(path))
    if any((path / name).is_file() for name in TOKENIZER_FILES):
        return Tokenizer.from_pretrained_dir(path)
    logging.warning("no tokenizer files %s in %s: the model has no tokenizer", TOKENIZER_FILES, path)
    return None


def _load_cached(entry: pathlib.Path, dtype, mesh: Mesh | None) -> Model | None:
    """The model from a model-cache entry, or None when the entry is missing or does not fit."""
    config = model_cache.read_entry_config(entry)
    if config is None:
        return None
    if mesh is None:
        device = jax.devices()[0]
        params = model_cache.read_params(entry, None, lambda _, array: jax.device_put(array, device, may_alias=False))
    else:
        annotated = abstract_params(config, dtype)
        params = model_cache.read_params(entry, nn.unbox(annotated), _placer(param_shardings(annotated, mesh), may_alias=False))
    if params is None:
        return None
    return Model(config, params, model_cache.read_tokenizer(entry), dtype, mesh)


def load(
    path_or_preset: str | os.PathLike,
    dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    seed: int = 0,
    cache: bool = True,
    quantize: str | None = None,
    group_size: int | None = None,
    quantize_lm_head: bool = True,
) -> Model:
    """Loads a GGUF file, an HF safetensors directory, a jinfer Orbax checkpoint, or a preset (random weights).

    With `cache`, a GGUF file is decoded once and kept in the model cache (see `checkpoint.model_cache`).
    `quantize` ("int8", "int4", "w4a8" or "w4a16" with `group_size`, or "w8a8") quantizes the linear layers' weights after
    loading (see `jinfer.quantize`), and the LM head unless `quantize_lm_head` is False (a head tied to
    the embedding gets a quantized copy; the embedding lookup stays in `dtype`). `quantize="gguf"` keeps
    a GGUF file's quantized linear weights as stored (`checkpoint.gguf_quant`: Q4_1 stays 4-bit, no
    float detour; a tied head stays float, an untied one is stored as the file has it).
    A quantized jinfer checkpoint (`jinfer convert --quantize=...`) restores its layouts directly;
    `quantize`, if given, must then name the mode it was made with.
    """
    check_quantize_mode(quantize, group_size)
    if quantize is not None and mesh is not None:
        raise ValueError(f"quantize={quantize!r} on a mesh is not supported yet: load it on one device (mesh=None)")
    path = pathlib.Path(path_or_preset).expanduser()
    if path.is_dir() and orbax_io.is_orbax_checkpoint(path) and orbax_io.read_quantization(path) is not None:
        return _load_quantized_checkpoint(path, dtype, mesh, quantize, group_size)
    if quantize == GGUF:
        return _load_gguf_as_shipped(path, dtype)
    model = _load_float(path_or_preset, dtype, mesh, seed, cache)
    if quantize is None:
        return model
    return dataclasses.replace(model, params=quantize_params(model.params, quantize, group_size, lm_head=quantize_lm_head))


def _load_quantized_checkpoint(path: pathlib.Path, dtype: Any, mesh: Mesh | None, quantize: str | None, group_size: int | None) -> Model:
    """A checkpoint written by `jinfer convert --quantize=...`: its layouts restored as stored."""
    record = orbax_io.read_quantization(path)
    if quantize is not None and (quantize, group_size) != (record["mode"], record["group_size"]):
        raise ValueError(
            f"{str(path)!r} holds weights quantized with quantize={record['mode']!r}, group_size={record['group_size']}; "
            f"it cannot be loaded with quantize={quantize!r}, group_size={group_size} (convert the float source again)"
        )
    if mesh is not None:
        raise ValueError(f"{str(path)!r} is quantized ({record['mode']}); quantized weights on a mesh are not supported yet (mesh=None)")
    dtype = resolve_dtype(dtype)
    start = time.perf_counter()
    config = orbax_io.read_config(path)
    abstract = abstract_quantized_params(nn.unbox(abstract_params(config, dtype)), record)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = orbax_io.restore(path, abstract, jax.tree.map(lambda _: device, abstract))
    logging.info("loaded %s (%s, %s weights) in %.2f s", path, config.architecture, record["mode"], time.perf_counter() - start)
    return Model(config, params, _tokenizer_for(path, None), dtype, None)


def _load_gguf_as_shipped(path: pathlib.Path, dtype: Any) -> Model:
    """A GGUF file whose quantized linear weights stay in their int8 / int4 layouts (not cached)."""
    if not (path.is_file() and path.suffix == ".gguf"):
        raise ValueError(f"quantize='gguf' keeps a GGUF file's quantized weights; {str(path)!r} is not a .gguf file")
    dtype = resolve_dtype(dtype)
    start = time.perf_counter()
    source = GGUFCheckpoint(path)
    config = config_lib.from_hf_config(source.hf_config(), source=str(path))
    annotated = abstract_params(config, dtype)
    place = _placer(param_shardings(annotated, None))
    params = load_params(source, annotated, config, place, source_name=str(path), read_quantized=gguf_quant.as_shipped_reader(source))
    logging.info("loaded %s (%s, GGUF weights as stored) in %.2f s", path, config.architecture, time.perf_counter() - start)
    return Model(config, params, _tokenizer_for(path, source), dtype, None)


def _load_float(path_or_preset: str | os.PathLike, dtype: Any, mesh: Mesh | None, seed: int, cache: bool) -> Model:
    dtype = resolve_dtype(dtype)
    path = pathlib.Path(path_or_preset).expanduser()
    start = time.perf_counter()
    if not path.exists():
        if str(path_or_preset) in config_lib.preset_names():
            config, _ = config_lib.read_preset(str(path_or_preset))
            shardings = param_shardings(abstract_params(config, dtype), mesh)
            params = jax.jit(init_params, static_argnums=(0, 1, 2), out_shardings=shardings)(config, dtype, seed)
            return Model(config, params, None, dtype, mesh)
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}, and it is not a preset name; presets: {config_lib.preset_names()}")
    entry = model_cache.entry_for(path, dtype) if cache and path.is_file() and path.suffix == ".gguf" else None
    cached = None if entry is None else _load_cached(entry, dtype, mesh)
    if cached is not None:
        logging.info("loaded %s from the model cache %s in %.2f s", path, entry, time.perf_counter() - start)
        return cached
    source = _open_source(path)
    if source is None:
        config = orbax_io.read_config(path)
        annotated = abstract_params(config, dtype)
        params = orbax_io.restore(path, nn.unbox(annotated), param_shardings(annotated, mesh))
    else:
        config = config_lib.from_hf_config(source.hf_config(), source=str(path))
        annotated = abstract_params(config, dtype)
        params = load_params(source, annotated, config, _placer(param_shardings(annotated, mesh)), source_name=str(path))
    tokenizer = _tokenizer_for(path, source)
    logging.info("loaded %s (%s) in %.2f s", path, config.architecture, time.perf_counter() - start)
    if entry is not None:
        model_cache.write(entry, config, params, tokenizer)
    return Model(config, params, tokenizer, dtype, mesh)
