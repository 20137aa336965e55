"""Which implementation runs the hot ops: the Pallas kernels or the XLA references.

A kernel mode is a static choice, part of what the engine step is compiled for:

- "auto": the Pallas kernels on TPU and GPU, the XLA references on any other backend (CPU);
- "reference": the XLA references everywhere;
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

KERNEL_MODES = ("auto", "reference", "pallas", "interpret")
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
    """-> "reference", "pallas" or "interpret": what `mode` (None: the scope's) means on `backend`
    (None: jax.default_backend()). "pallas" on a backend without Pallas kernels raises ValueError."""
    mode = check_kernel_mode(scope_mode() if mode is None else mode)
    backend = backend or jax.default_backend()
    accelerated = backend in ACCELERATOR_BACKENDS
    if mode == "auto":
        return "pallas" if accelerated else "reference"
    if mode == "pallas" and not accelerated:
        raise ValueError(
            f"kernels='pallas' needs a TPU or GPU backend, but the backend is {backend!r}: "
            "use kernels='interpret' to run the Pallas kernels interpreted, or 'reference'"
        )
    return mode
