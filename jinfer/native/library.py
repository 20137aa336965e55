"""Builds jinfer's CPU kernels (matmul.cc, matmul_panels.cc, attention.cc, norm.cc, sampling.cc) with the machine's C++ compiler, once per source and
machine, and registers them with XLA as FFI targets.

The shared library is cached under `JINFER_NATIVE_CACHE` (default `~/.cache/jinfer/native`), named
by a digest of the source, the compiler command, jaxlib's version and the CPU's feature flags, so a
change to any of them builds anew and a warm start only loads the file. It is compiled for this
CPU (`-march=native`). Without a working compiler `available()` is False (logged once) and the ops
use their XLA references.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import subprocess
import tempfile

import jax
import jaxlib
from absl import logging

SOURCES = tuple(pathlib.Path(__file__).with_name(name) for name in ("matmul.cc", "matmul_panels.cc", "attention.cc", "norm.cc", "sampling.cc"))
HEADERS = (pathlib.Path(__file__).with_name("vectors.h"),)
TARGETS = (
    "jinfer_matmul_f32",
    "jinfer_matmul_int8",
    "jinfer_matmul_int4",
    "jinfer_matmul_int4_symmetric",
    "jinfer_matmul_w4a8",
    "jinfer_matmul_w4a16",
    "jinfer_paged_attention_f32",
    "jinfer_paged_attention_int8",
    "jinfer_rms_norm",
    "jinfer_logit_stats",
)
LANES = 16  # float32 lanes per vector in the kernels: the sizes they vectorize over are multiples of it
CXXFLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


def cache_dir() -> pathlib.Path:
    default = pathlib.Path.home() / ".cache" / "jinfer" / "native"
    return pathlib.Path(os.environ.get("JINFER_NATIVE_CACHE", default))


def compile_command(output: pathlib.Path) -> list[str]:
    compiler = os.environ.get("CXX", "c++")
    return [compiler, *CXXFLAGS, "-isystem", jax.ffi.include_dir(), *map(str, SOURCES), "-o", str(output)]


def _cpu_flags() -> str:
    """The CPU's feature flags (the code is built for them), or the machine name where /proc is absent."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith(("flags", "Features"))), platform.machine())
    except OSError:
        return platform.machine()


def library_path() -> pathlib.Path:
    digest = hashlib.sha256()
    for part in (*(path.read_bytes() for path in SOURCES + HEADERS), " ".join(compile_command(pathlib.Path("out"))).encode(), jaxlib.__version__.encode(), _cpu_flags().encode()):
        digest.update(part)
    return cache_dir() / f"kernels-{digest.hexdigest()[:16]}.so"


def build() -> pathlib.Path:
    """The compiled library, built now if the cache does not hold it (an atomic rename, so processes
    building at once never load a half-written file)."""
    path = library_path()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        partial = pathlib.Path(scratch) / path.name
        logging.info("building jinfer's CPU kernels: %s", " ".join(compile_command(partial)))
        subprocess.run(compile_command(partial), check=True, capture_output=True, text=True)
        os.replace(partial, path)
    return path


@functools.cache
def load() -> ctypes.CDLL:
    """The built library, its kernels registered with XLA (once per process: XLA refuses a second
    registration of a target name from another library)."""
    library = ctypes.cdll.LoadLibrary(str(build()))
    for target in TARGETS:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, target)), platform="cpu")
    return library


@functools.cache
def available() -> bool:
    """Whether the CPU kernels are built and registered with XLA (built on the first call)."""
    try:
        load()
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or error
        logging.warning("jinfer's CPU kernels are unavailable, the XLA references run instead: %s", detail)
        return False
    return True


def ffi_call(target: str, result_shapes):
    """`jax.ffi.ffi_call` of one of TARGETS; RuntimeError if the kernels did not build."""
    if not available():
        raise RuntimeError("jinfer's CPU kernels did not build (see the warning logged): use kernels='reference'")
    return jax.ffi.ffi_call(target, result_shapes)
