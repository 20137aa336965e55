"""The engine step, traced once per bucket shape and kept on disk, so a warm start skips tracing.

Tracing the step means running the Flax model in Python over every unrolled layer: seconds for a
30-layer model, for every bucket shape, on every start. JAX's persistent compilation cache only
saves the XLA compile that follows. `StepPrograms` exports each traced step with `jax.export`
(StableHLO, serialized) into a directory, and beside it the program compiled by XLA for this
machine (`jax.experimental.serialize_executable`). A later process loads the executable and runs it:
it neither traces, lowers nor compiles (lowering the 30-layer program and hashing it for JAX's
compilation cache alone took ~0.5 s of a warm start). When only the machine differs (another CPU,
jaxlib or XLA_FLAGS), the exported program is compiled again without tracing.

A program's file name hashes everything the program depends on: jinfer's and its kernels' source
code, whether jinfer's CPU kernels are registered, the JAX version, the model config and dtype, and
the shapes and dtypes of every input; an executable's adds what the machine code depends on
(`_machine_key`). Arrays on a multi-device mesh bypass the directory (programs are kept for
single-device runs).

Loading an executable takes ~0.7 s for SmolLM2 (XLA rebuilds the program's ~1,000 thunks), most of
it outside the GIL. The directory remembers which executable the last process ran first
(`FIRST_PROGRAM_FILE`), and a new `StepPrograms` starts loading that one in a background thread,
so that a repeated command overlaps the load with building its engine and tokenizing its prompt.
The CLI starts it earlier still (`prefetch_first`), before loading the model.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import pathlib
import pickle
import platform
import threading
from typing import NamedTuple

import jax
import jaxlib
import numpy as np
from absl import logging
from jax import export
from jax.experimental import serialize_executable
from jax.experimental.compilation_cache import compilation_cache

from jinfer import native
from jinfer.config import ModelConfig
from jinfer.decode_loop import DecodeLoopBatch, decode_loop
from jinfer.ops import backend as kernel_backend
from jinfer.sampling import SampleResult
from jinfer.source_digest import source_digest
from jinfer.speculative_step import SpeculativeBatch, SpeculativeOutput, speculative_step
from jinfer.step import StepBatch, StepOutput, step

_OUTPUT_TREES = {
    StepBatch: jax.tree.structure(StepOutput(SampleResult(0, 0, 0, 0), 0)),
    SpeculativeBatch: jax.tree.structure(SpeculativeOutput(0, 0, 0, 0, 0, 0)),
    DecodeLoopBatch: jax.tree.structure(SampleResult(0, 0, 0, 0)),
}
_PROGRAMS = {StepBatch: step, SpeculativeBatch: speculative_step, DecodeLoopBatch: decode_loop}


def step_function(batch):
    """The jitted program a batch runs: `step`, `speculative_step` or `decode_loop`, by its type."""
    return _PROGRAMS[type(batch)]


def _signature(leaves) -> str:
    return ";".join(f"{np.dtype(leaf.dtype).name}{tuple(leaf.shape)}" for leaf in leaves)


def _device(leaves) -> jax.Device:
    """The one device of single-device (or abstract: the default device) inputs."""
    for group in leaves:
        for leaf in group:
            sharding = getattr(leaf, "sharding", None)
            if sharding is not None:
                return next(iter(sharding.device_set))
    return jax.devices()[0]


def _single_device(leaves) -> bool:
    shardings = [getattr(leaf, "sharding", None) for leaf in leaves]
    return all(sharding is None or len(sharding.device_set) == 1 for sharding in shardings)


class JitStep:
    """The step jitted in this process (no program directory): `step(params, kv_cache, batch)`, or
    `speculative_step` for a SpeculativeBatch."""

    def __init__(self, config: ModelConfig, dtype):
        self.config = config
        self.dtype = dtype

    def __call__(self, params, kv_cache, batch):
        return step_function(batch)(params, kv_cache, batch, config=self.config, dtype=self.dtype)

    def temp_bytes(self, params, kv_cache, batch) -> int | None:
        """XLA's temporaries of the compiled step for these (possibly abstract) inputs; None if unreported."""
        return _temp_bytes(step.lower(params, kv_cache, batch, config=self.config, dtype=self.dtype).compile())


def _temp_bytes(compiled: jax.stages.Compiled) -> int | None:
    analysis = compiled.memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def _compiler_options(batch) -> dict[str, str]:
    """XLA options for the program of `batch`. On CPU, a step of at most native.MAX_ROWS tokens, whose
    linear layers all run jinfer's kernels, is compiled without YNNPACK: it was left only attention's
    products and the reductions there, ran them about as fast (`python tools/bench_ynnpack.py`,
    SmolLM2, ms a step with / without: 32 tokens of one row 124.2 / 124.1, 1 row 42.0 / 42.0, 32 rows
    163.2 / 169.9; at 512-token contexts 45.0 / 45.4 and 479.1 / 445.8), and set up each of its ~190
    fusions on the program's first run: ~0.3 s of a warm start. Past 32 tokens XLA runs the linear
    layers, and YNNPACK stays (64 rows: 889.3 / 1022.3 ms)."""
    tokens = (batch if isinstance(batch, StepBatch) else batch.step).tokens.shape[0]
    if jax.default_backend() == "cpu" and kernel_backend.resolve("auto") == "native" and tokens <= native.MAX_ROWS:
        return {"xla_cpu_experimental_ynn_fusion_type": ""}
    return {}


def _load_executable(path: pathlib.Path, device: jax.Device) -> jax.stages.Compiled | None:
    """The executable saved at `path`, loaded to run on `device`; None (with a warning) if it does not load."""
    try:
        payload, in_tree, out_tree = pickle.loads(path.read_bytes())
        return serialize_executable.deserialize_and_load(payload, in_tree, out_tree, execution_devices=[device])
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, RuntimeError) as error:
        logging.warning("ignoring the unloadable executable %s: %s", path, error)
        return None


@contextlib.contextmanager
def _persistent_cache_off():
    """Compiles for real: an executable read back from JAX's persistent compilation cache serializes
    without some of its kernels (jaxlib 0.10 on CPU; running the reloaded copy fails with "Function
    ... not found"). The cache decides once per process whether it is on, hence the resets."""
    enabled = jax.config.jax_enable_compilation_cache
    compilation_cache.reset_cache()
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()


@functools.cache
def _machine_key() -> str:
    """What a compiled executable depends on beyond its program: jaxlib and the XLA backend's
    version, XLA_FLAGS, and the CPU (XLA:CPU emits code for the host's instruction set)."""
    backend = jax.devices()[0].client
    parts = [jaxlib.__version__, backend.platform, backend.platform_version, os.environ.get("XLA_FLAGS", ""), platform.machine(), _cpu_flags()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


FIRST_PROGRAM_FILE = "first-program.txt"  # the name of the executable the last process ran first


class _Program(NamedTuple):
    path: pathlib.Path  # where its executable is saved
    compiled: jax.stages.Compiled


class _Prefetch:
    """An executable being loaded in a background thread: `take()` waits for it (None if it failed)."""

    def __init__(self, path: pathlib.Path, device: jax.Device):
        self.path = path
        self._result = None
        self._thread = threading.Thread(target=self._load, args=(device,))  # not a daemon: never cut off inside XLA at exit
        self._thread.start()

    def _load(self, device: jax.Device) -> None:
        self._result = _load_executable(self.path, device)

    def take(self) -> jax.stages.Compiled | None:
        self._thread.join()
        return self._result


def _start_prefetch(directory: pathlib.Path) -> _Prefetch | None:
    """Starts loading the executable the last process on `directory` ran first, if there is one."""
    try:
        path = directory / (directory / FIRST_PROGRAM_FILE).read_text().strip()
    except OSError:
        return None
    if not path.is_file():
        return None
    kernel_backend.resolve("auto")  # registers jinfer's CPU kernels, which the executable calls
    return _Prefetch(path, jax.devices()[0])


_prefetches: dict[pathlib.Path, _Prefetch] = {}  # started by prefetch_first, taken by the StepPrograms on that directory


def prefetch_first(directory: str | pathlib.Path) -> None:
    """Starts loading, for the StepPrograms that will be built on `directory`, the executable the last
    process on it ran first: the CLI calls this before loading the model, so that the two overlap."""
    directory = pathlib.Path(directory).expanduser()
    if directory not in _prefetches and (prefetch := _start_prefetch(directory)) is not None:
        _prefetches[directory] = prefetch


class StepPrograms:
    """Calls the step like `step(params, kv_cache, batch)`, from serialized programs in `directory`.

    The KV cache stays donated: the program is called through a jit that donates it.
    """

    def __init__(self, directory: str | pathlib.Path, config: ModelConfig, dtype):
        self.directory = pathlib.Path(directory).expanduser()
        self.config = config
        self.dtype = dtype
        self._programs: dict[tuple, _Program] = {}  # by (tree structures, leaf shapes and dtypes)
        self._jit_step = JitStep(config, dtype)
        self._first_recorded = False
        self._prefetch = _prefetches.pop(self.directory, None) or _start_prefetch(self.directory)

    def __call__(self, params, kv_cache, batch):
        """params, kv_cache: pytrees of arrays; batch: a StepBatch or SpeculativeBatch -> (kv_cache, its output)."""
        leaves, trees = self._flatten(params, kv_cache, batch)
        if not _single_device(leaves[0] + leaves[1]):
            return self._jit_step(params, kv_cache, batch)
        program = self._program_for(leaves, trees, batch)
        cache_leaves, output_leaves = program.compiled(*leaves)
        if not self._first_recorded:
            self._first_recorded = True
            self._record_first(program.path)
        output_tree = _OUTPUT_TREES[type(batch)]
        return jax.tree.unflatten(trees[1], cache_leaves), jax.tree.unflatten(output_tree, output_leaves)

    def temp_bytes(self, params, kv_cache, batch) -> int | None:
        """Like `JitStep.temp_bytes`, remembered beside the program: a warm start compiles nothing for it."""
        leaves, trees = self._flatten(params, kv_cache, batch)
        if not _single_device(leaves[0] + leaves[1]):
            return self._jit_step.temp_bytes(params, kv_cache, batch)
        path = self.directory / f"step-{self._key(leaves, trees)}.temp_bytes.json"
        if path.is_file():
            return json.loads(path.read_text())
        value = _temp_bytes(self._program_for(leaves, trees, batch).compiled)
        _write_atomically(path, json.dumps(value).encode())
        return value

    @staticmethod
    def _flatten(params, kv_cache, batch):
        flat = [jax.tree.flatten(tree) for tree in (params, kv_cache, batch)]
        return [leaves for leaves, _ in flat], [tree for _, tree in flat]

    def _program_for(self, leaves, trees, batch) -> _Program:
        """The compiled program for these inputs; the file key is hashed only the first time a shape is seen."""
        shapes = (tuple(trees), tuple((leaf.shape, leaf.dtype) for group in leaves for leaf in group))
        if shapes not in self._programs:
            key = self._key(leaves, trees)
            path = self.directory / f"step-{key}-{_machine_key()}.executable"
            self._programs[shapes] = _Program(path, self._compiled(key, path, leaves, trees, _compiler_options(batch)))
        return self._programs[shapes]

    def _record_first(self, path: pathlib.Path) -> None:
        hint = self.directory / FIRST_PROGRAM_FILE
        if not hint.is_file() or hint.read_text().strip() != path.name:
            _write_atomically(hint, path.name.encode())

    def _compiled(self, key: str, path: pathlib.Path, leaves, trees, options: dict[str, str]) -> jax.stages.Compiled:
        """The executable saved at `path` (prefetched, or loaded now), else the program compiled (and
        its executable saved there)."""
        device = _device(leaves)
        if self._prefetch is not None and self._prefetch.path == path and device == jax.devices()[0]:
            compiled, self._prefetch = self._prefetch.take(), None
            if compiled is not None:
                return compiled
        if path.is_file() and (compiled := _load_executable(path, device)) is not None:
            return compiled
        program = self._program(key, leaves, trees)
        with _persistent_cache_off():
            compiled = jax.jit(program.call, donate_argnums=(1,)).lower(*leaves).compile(compiler_options=options)
        _write_atomically(path, pickle.dumps(serialize_executable.serialize(compiled)))
        return compiled

    def _key(self, leaves, trees) -> str:
        code = source_digest("jinfer", "pallas_kernels")
        kernels = kernel_backend.resolve("auto")  # on CPU: whether the native kernels (the program's FFI targets) are registered
        parts = [code, kernels, jax.__version__, repr(self.config), np.dtype(self.dtype).name, *map(str, trees), *map(_signature, leaves)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]

    def _program(self, key: str, leaves, trees) -> export.Exported:
        path = self.directory / f"step-{key}.jaxexport"
        if path.is_file():
            try:
                return export.deserialize(bytearray(path.read_bytes()))
            except (ValueError, RuntimeError) as error:
                logging.warning("ignoring the unreadable step program %s: %s", path, error)
        program = self._export(leaves, trees)
        self._save(path, program)
        return program

    def _export(self, leaves, trees) -> export.Exported:
        params_tree, cache_tree, batch_tree = trees

        def flat_step(params_leaves, cache_leaves, batch_leaves):
            batch = jax.tree.unflatten(batch_tree, batch_leaves)
            kv_cache, output = step_function(batch)(
                jax.tree.unflatten(params_tree, params_leaves),
                jax.tree.unflatten(cache_tree, cache_leaves),
                batch,
                config=self.config,
                dtype=self.dtype,
            )
            return jax.tree.leaves(kv_cache), jax.tree.leaves(output)

        specs = [[jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf in group] for group in leaves]
        native_calls = [export.DisabledSafetyCheck.custom_call(target) for target in native.TARGETS]
        return export.export(jax.jit(flat_step, donate_argnums=(1,)), disabled_checks=native_calls)(*specs)

    def _save(self, path: pathlib.Path, program: export.Exported) -> None:
        _write_atomically(path, program.serialize())


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
    """A failure only logs a warning: the program directory is an optimisation."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        staging.write_bytes(data)
        staging.replace(path)
    except OSError as error:
        logging.warning("could not write %s: %s", path, error)
