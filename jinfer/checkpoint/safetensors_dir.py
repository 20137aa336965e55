"""A Hugging Face checkpoint directory of safetensors files, read lazily tensor by tensor."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
from safetensors import SafetensorError, safe_open

INDEX_FILE = "model.safetensors.index.json"


class SafetensorsCheckpoint:
    """`model.safetensors`, or shards listed in `model.safetensors.index.json`, plus `config.json`."""

    def __init__(self, directory: str | os.PathLike):
        self.path = pathlib.Path(directory)
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint directory {str(self.path)!r} does not exist")
        self._handles = {}
        self._files = self._tensor_files()

    def _tensor_files(self) -> dict[str, pathlib.Path]:
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: self.path / file for name, file in weight_map.items()}
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            pickles = sorted(p.name for p in self.path.glob("*.bin")) + sorted(p.name for p in self.path.glob("*.pt*"))
            if pickles:
                raise ValueError(
                    f"{str(self.path)!r} holds only pickled weights {pickles}; pickles are never loaded "
                    "(they can run code). Convert them to safetensors first."
                )
            raise FileNotFoundError(f"no *.safetensors files in checkpoint directory {str(self.path)!r}")
        files = {}
        for shard in shards:
            for name in self._open(shard).keys():
                files[name] = shard
        return files

    def _open(self, file: pathlib.Path):
        handle = self._handles.get(file)
        if handle is None:
            if not file.is_file():
                raise FileNotFoundError(f"safetensors shard {str(file)!r} is missing")
            try:
                handle = safe_open(str(file), framework="numpy")
            except (SafetensorError, OSError) as error:
                raise ValueError(f"cannot read safetensors file {str(file)!r}: {error}") from error
            self._handles[file] = handle
        return handle

    def hf_config(self) -> dict:
        config = self.path / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"no config.json in checkpoint directory {str(self.path)!r}")
        return json.loads(config.read_text())

    def tensor_names(self) -> list[str]:
        return sorted(self._files)

    def tensor(self, name: str) -> np.ndarray:
        """The named tensor as stored (HF layout, stored dtype)."""
        if name not in self._files:
            raise KeyError(f"tensor {name!r} is missing from checkpoint {str(self.path)!r}")
        file = self._files[name]
        try:
            return self._open(file).get_tensor(name)
        except SafetensorError as error:
            raise ValueError(f"cannot read tensor {name!r} from {str(file)!r}: {error}") from error
