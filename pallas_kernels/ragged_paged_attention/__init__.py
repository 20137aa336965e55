"""Ragged paged attention: one batch of prefill chunks and decodes attending over a paged KV pool.

`ragged_paged_attention` picks the Pallas kernel for the backend (Mosaic TPU or Triton GPU);
`write_kv_pages` stores new K/V into the pool in place; `reference` defines what both must match.

The kernels are imported on first use (`__getattr__`): the reference and its helpers serve CPU
runs, which need not import Pallas's TPU and Triton modules (~0.2 s of a start).
"""

import importlib

from pallas_kernels.ragged_paged_attention.reference import (
    ragged_paged_attention_reference,
    write_kv_pages_reference,
)

_KERNELS = ("ragged_paged_attention", "ragged_paged_attention_gpu", "ragged_paged_attention_tpu", "write_kv_pages")


def __getattr__(name: str):
    if name in _KERNELS:
        return getattr(importlib.import_module("pallas_kernels.ragged_paged_attention.kernel"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ragged_paged_attention",
    "ragged_paged_attention_gpu",
    "ragged_paged_attention_reference",
    "ragged_paged_attention_tpu",
    "write_kv_pages",
    "write_kv_pages_reference",
]
