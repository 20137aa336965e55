"""Activations times int8 / int4 quantized weights (HF layout [N, K]) as Pallas kernels."""

from pallas_kernels.quantized_matmul.kernel import quantized_matmul, validate
from pallas_kernels.quantized_matmul.layout import (
    Int4Weights,
    Int8Weights,
    QuantizedWeights,
    dequantize,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from pallas_kernels.quantized_matmul.reference import quantized_matmul_reference

__all__ = [
    "Int4Weights",
    "Int8Weights",
    "QuantizedWeights",
    "dequantize",
    "pack_int4",
    "quantize_int4",
    "quantize_int8",
    "quantized_matmul",
    "quantized_matmul_reference",
    "unpack_int4",
    "validate",
]
