"""Which variant of a kernel runs: the TPU (Mosaic) or the GPU (Triton) one."""

from __future__ import annotations

import jax

IMPLEMENTATIONS = ("tpu", "gpu")


def pick_implementation(implementation: str | None, interpret: bool) -> str:
    """The kernel variant to run: explicit, else by `jax.default_backend()` (the TPU-style one when interpreted)."""
    if implementation is not None:
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
        return implementation
    backend = jax.default_backend()
    if backend in ("gpu", "cuda", "rocm"):
        return "gpu"
    if backend == "tpu" or interpret:
        return "tpu"
    raise ValueError(f"no Pallas kernel for backend {backend!r}; use the reference or interpret=True")
