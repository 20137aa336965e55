"""GGUF quantized tensors as jinfer's int8 / int4 weight layouts, decoded from the block bytes.

The integer codes and the per-block scales are read straight out of llama.cpp's blocks; no weight
passes through float32. Each supported type maps onto a layout exactly, so that
``layout.dequantize(quantized_tensor(...))`` reproduces ``gguf.quants.dequantize`` bit for bit:

=========  ======================  =====  =======================================================
GGUF type  layout                  group  value
=========  ======================  =====  =======================================================
Q8_0       Int8Weights             32     ``q * d``, q int8
Q5_0       Int8Weights             32     ``(q - 16) * d``, q 5-bit
Q6_K       Int8Weights             16     ``(q - 32) * (d * scale)``, q 6-bit, scale int8
Q4_0       Int4Weights symmetric   32     ``(q - 8) * d``
Q3_K       Int4Weights symmetric   16     ``(q - 4) * (d * (scale - 32))``, q 3-bit, stored as q + 4
Q4_1       Int4Weights asymmetric  32     ``q * d + m``
Q4_K       Int4Weights asymmetric  32     ``q * (d * scale) - dmin * min``, scale/min 6-bit
Q2_K       Int4Weights asymmetric  16     ``q * (d * scale) - dmin * min``, q 2-bit, scale/min 4-bit
=========  ======================  =====  =======================================================

``d``, ``m`` and ``dmin`` are float16, converted to float32 exactly; a K-quant's sub-block scale
``d * scale`` is formed in float32 as gguf forms it. In the asymmetric types the product
``q * scale`` has at most 11 + 6 + 4 = 21 significant bits (f16 mantissa, Q4_K's sub-block scale,
code), so it is exact in float32 and a fused multiply-add (XLA:CPU contracts ``q * s + m`` under
jit) rounds as the separate multiply and add do.

Unsupported: float types (no codes: use ``GGUFCheckpoint.tensor``); Q5_1 and Q5_K (5-bit
codes with a min: no asymmetric int8 layout); Q8_1 and Q8_K (llama.cpp's activation types, not
stored in model files); TQ1_0 and TQ2_0 (ternary codes with one scale per 256 values, a group
no kernel takes); the codebook and float-code types (IQ*, MXFP4, NVFP4), whose values are not an
affine function of an integer code.

The layouts of group 16 (Q6_K, Q3_K, Q2_K) dequantize exactly but are refused by the
``quantized_matmul`` kernels, which take groups of 32, 64 or 128.
"""

from __future__ import annotations

from collections.abc import Callable

import gguf
import jax
import numpy as np

from jinfer.checkpoint.gguf import _QK_PERMUTED, GGUFCheckpoint, _unpermute_rows
from jinfer.quantize import is_quantizable
from pallas_kernels.quantized_matmul.layout import Int4Weights, Int8Weights, QuantizedWeights, pack_int4

Q = gguf.GGMLQuantizationType
# Stored as plain floats: such a linear weight stays a float kernel in `as_shipped_reader`.
FLOAT_TYPES = frozenset({Q.F32, Q.F16, Q.BF16, Q.F64})

# 2-bit shifts that take four 2-bit codes out of a byte, lowest first.
_CRUMB_SHIFTS = np.array([0, 2, 4, 6], np.uint8)


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The float16 at byte `offset` of each block, as float32.

    blocks: uint8 [N, B, block bytes]; returns [N, B, 1].
    """
    return np.ascontiguousarray(blocks[..., offset : offset + 2]).view(np.float16).astype(np.float32)


def _nibbles(data: np.ndarray) -> np.ndarray:
    """data: uint8 [..., n] -> [..., 2n]: all low nibbles, then all high nibbles."""
    return np.concatenate([data & 0xF, data >> 4], axis=-1)


def _crumbs(data: np.ndarray) -> np.ndarray:
    """data: uint8 [..., n] -> [..., 4, n]: the 2-bit codes at bits 0-1, 2-3, 4-5, 6-7 of each byte."""
    return (data[..., None, :] >> _CRUMB_SHIFTS[:, None]) & 3


def _int8(values: np.ndarray, scales: np.ndarray) -> Int8Weights:
    """values: int [N, B, block size] codes; scales: float32 [N, B, groups per block]."""
    rows = values.shape[0]
    return Int8Weights(values=values.astype(np.int8).reshape(rows, -1), scales=scales.reshape(rows, -1))


def _int4(nibbles: np.ndarray, scales: np.ndarray, mins: np.ndarray | None = None) -> Int4Weights:
    """nibbles: [N, B, block size] codes 0..15; scales, mins: float32 [N, B, groups per block]."""
    rows = nibbles.shape[0]
    packed = pack_int4(nibbles.astype(np.uint8).reshape(rows, -1))
    return Int4Weights(
        packed=packed,
        scales=scales.reshape(rows, -1),
        mins=None if mins is None else mins.reshape(rows, -1),
    )


def _q8_0(blocks: np.ndarray) -> Int8Weights:
    """blocks: uint8 [N, B, 34] = d f16, 32 int8 codes."""
    return _int8(blocks[..., 2:].view(np.int8), _f16(blocks, 0))


def _q5_0(blocks: np.ndarray) -> Int8Weights:
    """blocks: uint8 [N, B, 22] = d f16, the 32 fifth bits (little-endian u32), 16 bytes of nibbles."""
    fifth_bits = np.unpackbits(blocks[..., 2:6], axis=-1, bitorder="little")
    codes = _nibbles(blocks[..., 6:]) | (fifth_bits << 4)
    return _int8(codes.astype(np.int8) - 16, _f16(blocks, 0))


def _q6_k(blocks: np.ndarray) -> Int8Weights:
    """blocks: uint8 [N, B, 210] = 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8
    sub-block scales, d f16. Each half of 128 values takes its low 4 bits from 64 bytes
    (nibbles) and its high 2 bits from 32 bytes (2-bit codes)."""
    rows, num_blocks = blocks.shape[:2]
    low = _nibbles(blocks[..., :128].reshape(rows, num_blocks, 2, 64))
    high = _crumbs(blocks[..., 128:192].reshape(rows, num_blocks, 2, 32)).reshape(rows, num_blocks, 2, 128)
    codes = (low | (high << 4)).astype(np.int8) - 32
    scales = _f16(blocks, 208) * blocks[..., 192:208].view(np.int8).astype(np.float32)
    return _int8(codes.reshape(rows, num_blocks, 256), scales)


def _q4_0(blocks: np.ndarray) -> Int4Weights:
    """blocks: uint8 [N, B, 18] = d f16, 16 bytes of nibbles (values 0-15 low, 16-31 high)."""
    return _int4(_nibbles(blocks[..., 2:]), _f16(blocks, 0))


def _q4_1(blocks: np.ndarray) -> Int4Weights:
    """blocks: uint8 [N, B, 20] = d f16, m f16, 16 bytes of nibbles."""
    return _int4(_nibbles(blocks[..., 4:]), _f16(blocks, 0), _f16(blocks, 2))


def _q3_k(blocks: np.ndarray) -> Int4Weights:
    """blocks: uint8 [N, B, 110] = 32 bytes of third bits, 64 of 2-bit codes, 12 of packed 6-bit
    scales, d f16. A value's code is its 2-bit code minus 4 unless its third bit is set."""
    rows, num_blocks = blocks.shape[:2]
    low = _crumbs(blocks[..., 32:96].reshape(rows, num_blocks, 2, 32))
    # Bit b of the 32 mask bytes belongs to the b-th run of 32 values.
    third = np.unpackbits(blocks[..., :32], axis=-1, bitorder="little").reshape(rows, num_blocks, 32, 8)
    third = third.swapaxes(-1, -2).reshape(low.shape)
    nibbles = (low + 4 * third + 4).reshape(rows, num_blocks, 256)
    return _int4(nibbles, _f16(blocks, 108) * _q3_k_scales(blocks[..., 96:108]).astype(np.float32))


def _q3_k_scales(packed: np.ndarray) -> np.ndarray:
    """packed: uint8 [N, B, 12] -> the 16 signed sub-block scales int8 [N, B, 16]: low 4 bits
    from the nibbles of bytes 0-7, high 2 bits of scale 4k + b from byte 8 + b at bit 2k."""
    low = _nibbles(packed[..., :8])
    high = _crumbs(packed[..., 8:12]).reshape(low.shape)
    return (low | (high << 4)).astype(np.int8) - 32


def _q4_k(blocks: np.ndarray) -> Int4Weights:
    """blocks: uint8 [N, B, 144] = d f16, dmin f16, 12 bytes of packed 6-bit scales and mins,
    128 bytes of nibbles (per 32 bytes: 32 values low, the next 32 high)."""
    rows, num_blocks = blocks.shape[:2]
    nibbles = _nibbles(blocks[..., 16:].reshape(rows, num_blocks, 4, 32)).reshape(rows, num_blocks, 256)
    scales, mins = _q4_k_scales_mins(blocks[..., 4:16])
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    return _int4(nibbles, d * scales.astype(np.float32), -(dmin * mins.astype(np.float32)))


def _q4_k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """packed: uint8 [N, B, 12] -> 8 scales and 8 mins, uint8 [N, B, 8] each (6 bits).

    Bytes 0-3 hold scales 0-3, bytes 4-7 mins 0-3 (low 6 bits); scales and mins 4-7 take their
    low 4 bits from the nibbles of bytes 8-11 and their high 2 bits from the top of bytes 0-7.
    """
    scale_bytes, min_bytes, low_high = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = np.concatenate([scale_bytes & 63, (low_high & 0xF) | ((scale_bytes >> 6) << 4)], axis=-1)
    mins = np.concatenate([min_bytes & 63, (low_high >> 4) | ((min_bytes >> 6) << 4)], axis=-1)
    return scales, mins


def _q2_k(blocks: np.ndarray) -> Int4Weights:
    """blocks: uint8 [N, B, 84] = 16 bytes of 4-bit (scale, min) pairs, 64 bytes of 2-bit
    codes, d f16, dmin f16."""
    rows, num_blocks = blocks.shape[:2]
    codes = _crumbs(blocks[..., 16:80].reshape(rows, num_blocks, 2, 32)).reshape(rows, num_blocks, 256)
    packed_scales = blocks[..., :16]
    scales = _f16(blocks, 80) * (packed_scales & 0xF).astype(np.float32)
    mins = -(_f16(blocks, 82) * (packed_scales >> 4).astype(np.float32))
    return _int4(codes, scales, mins)


# GGUF type -> decoder of its blocks uint8 [N, B, block bytes].
_DECODERS: dict[Q, Callable[[np.ndarray], QuantizedWeights]] = {
    Q.Q8_0: _q8_0,
    Q.Q5_0: _q5_0,
    Q.Q6_K: _q6_k,
    Q.Q4_0: _q4_0,
    Q.Q3_K: _q3_k,
    Q.Q4_1: _q4_1,
    Q.Q4_K: _q4_k,
    Q.Q2_K: _q2_k,
}
SUPPORTED_TYPES = frozenset(_DECODERS)


def _supported(qtype: Q, name: str) -> Q:
    """`qtype` as a GGMLQuantizationType; ValueError naming the tensor if it has no layout."""
    qtype = Q(qtype)
    if qtype not in _DECODERS:
        supported = ", ".join(sorted(t.name for t in _DECODERS))
        raise ValueError(
            f"{name} is stored as GGUF type {qtype.name}, which has no int8/int4 layout; supported: {supported}"
        )
    return qtype


def decode_blocks(
    data: np.ndarray,  # uint8 [N, bytes per row]: N rows of whole GGUF blocks
    qtype: Q,
    name: str = "tensor",
) -> QuantizedWeights:
    """The int8 / int4 layout of the [N, K] weight whose rows are stored as `qtype` blocks.

    Arrays are numpy, on the host. Raises ValueError naming `name` for a type with no layout
    or for bytes that are not whole blocks.
    """
    qtype = _supported(qtype, name)
    _, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    if data.ndim != 2 or data.dtype != np.uint8 or data.shape[1] % block_bytes:
        raise ValueError(
            f"{name}: {qtype.name} data must be uint8 [rows, a multiple of {block_bytes} bytes], "
            f"got {data.dtype} {data.shape}"
        )
    rows = data.shape[0]
    return _DECODERS[qtype](data.reshape(rows, -1, block_bytes))


def quantized_tensor(checkpoint: GGUFCheckpoint, hf_name: str) -> QuantizedWeights:
    """The weight `hf_name` of a GGUF file as an int8 / int4 layout, in HF layout [out, in].

    Undoes llama.cpp's q_proj/k_proj row permutation as ``GGUFCheckpoint.tensor`` does. The
    permutation moves whole rows and GGUF quantizes each row on its own, so moving the rows of
    codes, scales and mins together gives the blocks of the un-permuted weight.
    """
    qtype, data, shape = checkpoint.raw_tensor(hf_name)
    _supported(qtype, hf_name)
    if len(shape) != 2:
        raise ValueError(f"{hf_name} has shape {shape}; int8/int4 layouts hold 2-D weights")
    weights = decode_blocks(data.reshape(shape[0], -1), qtype, hf_name)
    num_heads = _permuted_heads(checkpoint, hf_name)
    if num_heads is None:
        return weights
    return jax.tree.map(lambda rows: _unpermute_rows(rows, num_heads), weights)


def _permuted_heads(checkpoint: GGUFCheckpoint, hf_name: str) -> int | None:
    """The head count whose rows llama.cpp permuted in `hf_name`, or None if it did not."""
    arch = checkpoint.metadata["general.architecture"]
    if arch not in _QK_PERMUTED:
        return None
    if hf_name.endswith("q_proj.weight"):
        return checkpoint.metadata[f"{arch}.attention.head_count"]
    if hf_name.endswith("k_proj.weight"):
        return checkpoint.metadata[f"{arch}.attention.head_count_kv"]
    return None


def as_shipped_reader(checkpoint: GGUFCheckpoint):
    """The `read_quantized` hook of `checkpoint.weights.load_params` that keeps a GGUF file's
    quantized linear weights in their int8 / int4 layouts (`jinfer.load(..., quantize="gguf")`).

    Linear kernels stored as floats stay float; any other parameter (embedding, norms) is read as
    float. A linear weight of a type with no layout raises ValueError naming it and its type.
    """

    def read(path: tuple[str, ...], hf_name: str, hf_shape: tuple[int, ...]) -> QuantizedWeights | None:
        if not is_quantizable(path) or Q(checkpoint.raw_tensor(hf_name)[0]) in FLOAT_TYPES:
            return None
        weights = quantized_tensor(checkpoint, hf_name)
        if weights.shape != tuple(hf_shape):
            raise ValueError(f"{hf_name} has shape {weights.shape} in {checkpoint.path}, expected {tuple(hf_shape)}")
        return weights

    return read
