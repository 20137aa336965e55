"""Grouped (MoE) matmul as Pallas kernels: rows sorted by expert times per-expert weights."""

from pallas_kernels.grouped_matmul.kernel import grouped_matmul, validate
from pallas_kernels.grouped_matmul.reference import grouped_matmul_reference
from pallas_kernels.grouped_matmul.segments import Segments, make_segments

__all__ = ["Segments", "grouped_matmul", "grouped_matmul_reference", "make_segments", "validate"]
