"""Which implementation runs the hot ops: the Pallas kernels or the XLA references.

A kernel mode is a static choice, part of what the engine step is compiled for:

- "auto": the Pallas kernels on TPU and GPU; on CPU the native kernels (`jinfer.native`) where an op
  has one and they build, the XLA references otherwise;
- "reference": the XLA references everywhere;
- "native": the CPU kernels of `jinfer.native` for the ops and shapes they take (few-row matmuls),
  the XLA references for the rest (CPU only);
- "pallas": the Pallas kernels, compiled for the backend (TPU or GPU only);
- "interpret": the Pallas kernels run by Pallas's interpreter, on any backend (slow: tests on CPU).

The engine's attention backend carries its mode as a field. Ops called from inside model modules
that take no backend (the MoE grouped matmul) read the mode of the enclosing `kernel_scope`, which
`jinfer.step.step` opens while it traces the model; outside any scope the mode is "auto".
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

from jinfer import native

KERNEL_MODES = ("auto", "reference", "native", "pallas", "interpret")
ACCELERATOR_BACKENDS = ("tpu", "gpu", "cuda", "rocm")

_SCOPE_MODE = contextvars.ContextVar("jinfer_kernel_mode", default="auto")


def check_kernel_mode(mode: str) -> str:
    """Returns `mode`, or raises ValueError naming it if it is not one of KERNEL_MODES."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernels={mode!r} is not one of {KERNEL_MODES}")
    return mode


@contextlib.contextmanager
def kernel_scope(mode: str) -> Iterator[None]:
    """Ops traced inside the block that are given no mode of their own use `mode`."""
    token = _SCOPE_MODE.set(check_kernel_mode(mode))
    try:
        yield
    finally:
        _SCOPE_MODE.reset(token)


def scope_mode() -> str:
    """The mode of the innermost `kernel_scope` ("auto" outside any)."""
    return _SCOPE_MODE.get()


def resolve(mode: str | None = None, backend: str | None = None) -> str:
    """-> "reference", "native", "pallas" or "interpret": what `mode` (None: the scope's) means on
    `backend` (None: jax.default_backend()). "pallas" without a TPU or GPU, or "native" off the CPU,
    raises ValueError; "native" whose kernels do not build falls back to "reference" (logged)."""
    mode = check_kernel_mode(scope_mode() if mode is None else mode)
    backend = backend or jax.default_backend()
    accelerated = backend in ACCELERATOR_BACKENDS
    if mode == "auto":
        return "pallas" if accelerated else _native_or_reference(backend)
    if mode == "pallas" and not accelerated:
        raise ValueError(
            f"kernels='pallas' needs a TPU or GPU backend, but the backend is {backend!r}: "
            "use kernels='interpret' to run the Pallas kernels interpreted, or 'reference'"
        )
    if mode == "native":
        if backend != "cpu":
            raise ValueError(f"kernels='native' runs jinfer's CPU kernels, but the backend is {backend!r}")
        return _native_or_reference(backend)
    return mode


def for_mesh(mode: str, mesh) -> str:
    """The mode an engine over `mesh` (None: one device) runs: the native CPU kernels are not
    partitioned over a mesh, so "auto" on a CPU mesh of several devices means the XLA references."""
    several = mesh is not None and mesh.size > 1
    return "reference" if mode == "auto" and several and jax.default_backend() == "cpu" else mode


def runs_pallas(mode: str) -> bool:
    """Whether a resolved mode runs the Pallas kernels (compiled or interpreted)."""
    return mode in ("pallas", "interpret")


def _native_or_reference(backend: str) -> str:
    return "native" if backend == "cpu" and native.available() else "reference"
