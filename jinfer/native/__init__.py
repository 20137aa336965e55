"""jinfer's CPU kernels, built from C++ and called through XLA's FFI:

- matrix products with few rows (decode, speculative verification), float32 activations against
  float32, int8 or int4 weights, read once per call at memory speed. XLA:CPU runs those shapes well
  below the machine's memory bandwidth, and runs weight-only int8 / int4 products by dequantizing
  the whole matrix first. `jinfer.ops.matmul` calls them in kernel mode "native";
- ragged attention over the float32 KV page pool, reading each row's keys and values in place
  instead of gathering its pages. `jinfer.ops.attention.PagedAttention` calls it in mode "native";
- RMS normalization of float32 rows on the calling thread (`jinfer.models.layers.RMSNorm`);
- each row's maximum logit, its first index and log-sum-exp in two passes (`jinfer.sampling.sample`).
"""

from jinfer.native.attention import paged_attention, supports_paged_attention
from jinfer.native.library import TARGETS, available
from jinfer.native.norm import rms_norm, supports_rms_norm
from jinfer.native.sampling import logit_stats, supports_logit_stats
from jinfer.native.matmul import MAX_ROWS, MAX_W8A8_ROWS, dense_matmul, quantized_matmul, supports_dense, supports_quantized

__all__ = [
    "MAX_ROWS",
    "MAX_W8A8_ROWS",
    "TARGETS",
    "available",
    "dense_matmul",
    "logit_stats",
    "paged_attention",
    "quantized_matmul",
    "rms_norm",
    "supports_dense",
    "supports_logit_stats",
    "supports_paged_attention",
    "supports_quantized",
    "supports_rms_norm",
]
