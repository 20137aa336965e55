"""jinfer's CPU kernels: matrix products with few rows (decode, speculative verification), float32
activations against float32, int8 or int4 weights, read once per call at memory speed. XLA:CPU runs
those shapes well below the machine's memory bandwidth, and runs weight-only int8 / int4 products
by dequantizing the whole matrix first. `jinfer.ops.matmul` calls them in kernel mode "native"."""

from jinfer.native.library import TARGETS, available
from jinfer.native.matmul import MAX_ROWS, MAX_W8A8_ROWS, dense_matmul, quantized_matmul, supports_dense, supports_quantized

__all__ = ["MAX_ROWS", "MAX_W8A8_ROWS", "TARGETS", "available", "dense_matmul", "quantized_matmul", "supports_dense", "supports_quantized"]
