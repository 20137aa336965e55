"""Ragged paged attention: one batch of prefill chunks and decodes attending over a paged KV pool.

`ragged_paged_attention` picks the Pallas kernel for the backend (Mosaic TPU or Triton GPU);
`write_kv_pages` stores new K/V into the pool in place; `reference` defines what both must match.
"""

from pallas_kernels.ragged_paged_attention.kernel import (
    ragged_paged_attention,
    ragged_paged_attention_gpu,
    ragged_paged_attention_tpu,
    write_kv_pages,
)
from pallas_kernels.ragged_paged_attention.reference import (
    ragged_paged_attention_reference,
    write_kv_pages_reference,
)

__all__ = [
    "ragged_paged_attention",
    "ragged_paged_attention_gpu",
    "ragged_paged_attention_reference",
    "ragged_paged_attention_tpu",
    "write_kv_pages",
    "write_kv_pages_reference",
]
