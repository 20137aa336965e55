"""A cache of models decoded from GGUF files, so the second start reads plain arrays.

Decoding a GGUF file (dequantizing every block, rebuilding the tokenizer from its vocabulary)
takes seconds; reading the same weights back from a safetensors file takes a fraction of one.
An entry is keyed by the source file's path, size and modification time, the dtype and the code
that defines the parameter tree (jinfer/models), and
holds `params.safetensors` (jinfer parameter paths), the tagged `config.json` of Orbax
checkpoints and the tokenizer files. Entries are written to a temporary directory and renamed
into place, so a crash never leaves a half-written entry behind.

The cache lives in `$JINFER_MODEL_CACHE`, else `~/.cache/jinfer/models`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import shutil
import struct
import tempfile
from typing import Callable

import jax
import ml_dtypes
import numpy as np
import safetensors.numpy
from absl import logging
from flax import traverse_util

from jinfer.checkpoint.orbax_io import CONFIG_FILE, FORMAT_TAG, read_config
from jinfer.config import ModelConfig, config_to_dict
from jinfer.source_digest import source_digest
from jinfer.tokenizer import Tokenizer

FORMAT_VERSION = 1
_SAFETENSORS_DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16)}
PARAMS_FILE = "params.safetensors"
SEPARATOR = "/"


def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("JINFER_MODEL_CACHE") or pathlib.Path.home() / ".cache" / "jinfer" / "models")


def entry_for(source: pathlib.Path, dtype) -> pathlib.Path:
    """The cache directory of `source` loaded as `dtype` (it may not exist yet)."""
    stat = source.stat()
    identity = f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{np.dtype(dtype).name}|{FORMAT_VERSION}|{source_digest('jinfer/models')}"
    return cache_root() / f"{source.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


def read_entry_config(entry: pathlib.Path) -> ModelConfig | None:
    """The config of a complete entry, or None when there is none."""
    if not (entry / PARAMS_FILE).is_file():
        return None
    return read_config(entry)


def read_params(entry: pathlib.Path, abstract_params, place: Callable):
    """The entry's parameters, or None (with a warning) if they are not exactly `abstract_params`.

    abstract_params: the expected tree of ShapeDtypeStructs, or None to take the entry as it is (its
    key already pins the model code, source file and dtype, and tracing the model's init to get the
    tree costs a warm start seconds); place(path, host_array) puts each array on its device(s) and
    must copy it (the host arrays are views of the mapped file).
    """
    try:
        stored = _mapped_tensors(entry / PARAMS_FILE)
    except (ValueError, KeyError, OSError, struct.error) as error:
        logging.warning("model cache entry %s is unreadable (%s); ignoring it", entry, error)
        return None
    if abstract_params is not None and not _fits(stored, traverse_util.flatten_dict(abstract_params, sep=SEPARATOR)):
        logging.warning("model cache entry %s does not match the model's parameters; ignoring it", entry)
        return None
    params = {name: place(tuple(name.split(SEPARATOR)), array) for name, array in stored.items()}
    return traverse_util.unflatten_dict(params, sep=SEPARATOR)


def _mapped_tensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    """name -> read-only view of the tensor in the memory-mapped safetensors file.

    The file is mapped rather than read with `safetensors.safe_open`, whose numpy tensors are copied
    through Python bytes: ~0.45 s for SmolLM2's 538 MB against ~0.25 s for mapping and placing them
    (a warm start's model load). The format: an 8-byte little-endian header length, a JSON header of
    name -> {dtype, shape, data_offsets}, then the data, offsets counted from the header's end.
    """
    data = np.memmap(path, dtype=np.uint8, mode="r")
    (header_length,) = struct.unpack("<Q", data[:8].tobytes())
    header = json.loads(data[8 : 8 + header_length].tobytes())
    start = 8 + header_length
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        if start + end > data.size or (end - begin) != dtype.itemsize * math.prod(info["shape"]):
            raise ValueError(f"tensor {name} of shape {info['shape']} lies outside the file's {data.size} bytes")
        tensors[name] = data[start + begin : start + end].view(dtype).reshape(info["shape"])
    return tensors


def _fits(stored: dict[str, np.ndarray], expected: dict) -> bool:
    """Whether the stored tensors have exactly the expected names, shapes and dtypes."""
    if set(stored) != set(expected):
        return False
    return all(stored[name].shape == spec.shape and stored[name].dtype == np.dtype(spec.dtype) for name, spec in expected.items())


def read_tokenizer(entry: pathlib.Path) -> Tokenizer | None:
    return Tokenizer.from_pretrained_dir(entry) if (entry / "tokenizer.json").is_file() else None


def write(entry: pathlib.Path, config: ModelConfig, params, tokenizer: Tokenizer | None) -> None:
    """Writes the entry atomically; a failure to write only logs a warning (the cache is an optimisation)."""
    staging = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
        flat = {name: np.asarray(jax.device_get(array)) for name, array in traverse_util.flatten_dict(params, sep=SEPARATOR).items()}
        safetensors.numpy.save_file(flat, str(staging / PARAMS_FILE))
        (staging / CONFIG_FILE).write_text(json.dumps({"format": FORMAT_TAG, **config_to_dict(config)}, indent=2))
        if tokenizer is not None:
            tokenizer.save(staging)
        shutil.rmtree(entry, ignore_errors=True)
        staging.rename(entry)
        logging.info("cached the decoded model in %s", entry)
    except OSError as error:
        logging.warning("could not write the model cache entry %s: %s", entry, error)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
