"""GGUF's quantized tensor types, decoded exactly into what MLX computes with.

A GGUF tensor is rows of blocks along its row (``ne[0]``); each type's block layout is
llama.cpp's (ggml-common.h). Every value this module gives is bit for bit the value llama.cpp's
(and the ``gguf`` package's) float32 dequantization gives:

- Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (blocks of 32) and Q4_K, Q5_K (super-blocks of 256 made of
  eight 32-element sub-blocks) are repacked into MLX's affine quantization, group size 32, at
  their own bit width (4, 5 or 8): each group's value is ``scale * q + bias`` with a ``q`` of
  0..2**bits - 1. Q4_0 is ``d * (q - 8)``, so its scale is ``d`` and its bias ``-8 * d``; Q8_0's
  signed ``q`` is offset by 128 (bias ``-128 * d``); a K-quant sub-block's ``d * sc * q -
  dmin * m`` has scale ``d * sc`` and bias ``-dmin * m``. Scales and biases are float16 where
  every one of a tensor's is a float16 exactly (true of the 32-blocks' ``d`` and ``m``), else
  float32 (a K-quant's ``d * sc`` needs up to 17 significant bits).
- Q6_K, Q3_K and Q2_K scale 16-element sub-blocks, which no MLX quantization layout has (its
  affine groups are 32, 64 or 128 elements), so they are decoded to float32 (``d * sc * q``
  needs more than float16's 11 significant bits), or float16 for a tensor whose every value is
  a float16 exactly.

MLX packs a row of ``bits``-bit values as one little-endian bit stream in uint32 words (value
``i`` in bits ``i * bits`` to ``(i + 1) * bits - 1``), for every width; that is written here
directly. A tensor is decoded a slice of rows at a time, so the working memory beyond the
result stays near ``CHUNK_ELEMENTS`` values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

GROUP_SIZE = 32  # MLX's affine group: one GGUF block, or one K-quant sub-block
CHUNK_ELEMENTS = 1 << 22  # values decoded at a time (a few bytes of scratch each)

# A packed decoder gives, for n blocks, the q values (n, block) uint8 and the scales and
# biases (n, block // 32) float32; a float decoder gives the values (n, block) float32.
PackedDecoder = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
FloatDecoder = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class QuantType:
    """A GGUF quantized type: ``block`` values in ``size`` bytes, decoded by ``packed`` into
    MLX's affine quantization of ``bits`` bits, or by ``floats`` (then ``bits`` is None)."""

    block: int
    size: int
    bits: int | None
    packed: PackedDecoder | None = None
    floats: FloatDecoder | None = None


@dataclass(frozen=True)
class Quantized:
    """A tensor in MLX's affine quantization, group size 32: ``weight`` uint32 (..., K * bits
    / 32), ``scales`` and ``biases`` (..., K / 32), both float16 or both float32."""

    weight: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    bits: int


def _half(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The float16 at ``offset`` of every block, as float32 (n, 1)."""
    return np.ascontiguousarray(blocks[:, offset : offset + 2]).view("<f2").astype(np.float32)


def _nibbles(data: np.ndarray) -> np.ndarray:
    """Bytes (..., m) -> (..., 2m): the low nibbles, then the high ones."""
    return np.concatenate([data & 0xF, data >> 4], axis=-1)


def _bits(data: np.ndarray) -> np.ndarray:
    """Bytes (n, m) of a little-endian integer -> its 8m bits (n, 8m), bit 0 first."""
    return np.unpackbits(data, axis=-1, bitorder="little")


def _q4_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # d, qs[16]
    d = _half(b, 0)
    return _nibbles(b[:, 2:18]), d, -8 * d


def _q4_1(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # d, m, qs[16]
    return _nibbles(b[:, 4:20]), _half(b, 0), _half(b, 2)


def _q5_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # d, qh[4], qs[16]
    d = _half(b, 0)
    return _nibbles(b[:, 6:22]) | (_bits(b[:, 2:6]) << 4), d, -16 * d


def _q5_1(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # d, m, qh[4], qs[16]
    return _nibbles(b[:, 8:24]) | (_bits(b[:, 4:8]) << 4), _half(b, 0), _half(b, 2)


def _q8_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # d, int8 qs[32]
    d = _half(b, 0)
    return b[:, 2:34] ^ 0x80, d, -128 * d  # int8 q + 128, as uint8


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 scale bytes -> eight 6-bit scales and eight 6-bit mins (n, 8) each."""
    low = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    high = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    scales = np.concatenate([s[:, 0:4] & 63, low], axis=1)
    mins = np.concatenate([s[:, 4:8] & 63, high], axis=1)
    return scales, mins


def _q4_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # d, dmin, scales[12], qs[128]: 32 bytes hold sub-blocks 2i (low nibbles), 2i+1 (high)
    sc, m = _k_scales(b[:, 4:16])
    q = _nibbles(b[:, 16:144].reshape(-1, 4, 32)).reshape(-1, 256)
    return q, _half(b, 0) * sc, -(_half(b, 2) * m)


def _q5_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # d, dmin, scales[12], qh[32], qs[128]: sub-block s's fifth bits are bit s of qh
    sc, m = _k_scales(b[:, 4:16])
    low = _nibbles(b[:, 48:176].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    high = (b[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[:, None]) & 1
    return (low | (high << 4)).reshape(-1, 256), _half(b, 0) * sc, -(_half(b, 2) * m)


_SHIFTS_2 = 2 * np.arange(4, dtype=np.uint8)[:, None]  # the four 2-bit fields of a byte
_MASK_BITS = np.arange(8, dtype=np.uint8).reshape(2, 4, 1)  # Q3_K's hmask bit 4a + j


def _q6_k(b: np.ndarray) -> np.ndarray:
    # ql[128], qh[64], int8 scales[16], d: value 128a + 32t + i (i < 32) has as its low 4 bits
    # the low (t < 2) or high nibble of ql[64a + 32 * (t % 2) + i], as its top 2 bits bits 2t
    # and 2t + 1 of qh[32a + i]; q - 32 is scaled by its 16 values' scale
    ql = b[:, 0:128].reshape(-1, 2, 2, 32)
    low = np.concatenate([ql & 0xF, ql >> 4], axis=2)  # (n, 2, 4, 32): t = 2 * nibble + c
    high = (b[:, 128:192].reshape(-1, 2, 1, 32) >> _SHIFTS_2) & 3
    q = (low | (high << 4)).reshape(-1, 16, 16).astype(np.int8) - np.int8(32)
    scales = _half(b, 208) * b[:, 192:208].view(np.int8)
    return (scales[:, :, None] * q).reshape(-1, 256)


def _q3_k(b: np.ndarray) -> np.ndarray:
    # hmask[32], qs[64], scales[12], d: value 128a + 32j + i (i < 32) is bits 2j, 2j + 1 of
    # qs[32a + i], less 4 unless bit 4a + j of hmask[i] is set; its 6-bit scale (less 32) is
    # spread over the 12 scale bytes (low nibbles, high nibbles, then 2-bit tops).
    s = b[:, 96:108]
    tops = (s[:, None, 8:12] >> _SHIFTS_2) & 3
    scales = (_nibbles(s[:, 0:8]) | (tops.reshape(-1, 16) << 4)).astype(np.int8) - np.int8(32)
    q = (b[:, 32:96].reshape(-1, 2, 1, 32) >> _SHIFTS_2) & 3
    mask = (b[:, None, None, 0:32] >> _MASK_BITS) & 1
    values = q.astype(np.int8) - np.int8(4) * (np.int8(1) - mask.astype(np.int8))
    return ((_half(b, 108) * scales)[:, :, None] * values.reshape(-1, 16, 16)).reshape(-1, 256)


def _q2_k(b: np.ndarray) -> np.ndarray:
    # scales[16] (low nibble: scale, high: min), qs[64], d, dmin: value 128a + 32j + i is
    # bits 2j, 2j + 1 of qs[32a + i]
    s = b[:, 0:16]
    q = ((b[:, 16:80].reshape(-1, 2, 1, 32) >> _SHIFTS_2) & 3).reshape(-1, 16, 16)
    scales, mins = _half(b, 80) * (s & 0xF), _half(b, 82) * (s >> 4)
    return (scales[:, :, None] * q - mins[:, :, None]).reshape(-1, 256)


TYPES: dict[str, QuantType] = {
    "Q4_0": QuantType(32, 18, 4, packed=_q4_0),
    "Q4_1": QuantType(32, 20, 4, packed=_q4_1),
    "Q5_0": QuantType(32, 22, 5, packed=_q5_0),
    "Q5_1": QuantType(32, 24, 5, packed=_q5_1),
    "Q8_0": QuantType(32, 34, 8, packed=_q8_0),
    "Q4_K": QuantType(256, 144, 4, packed=_q4_k),
    "Q5_K": QuantType(256, 176, 5, packed=_q5_k),
    "Q6_K": QuantType(256, 210, None, floats=_q6_k),
    "Q3_K": QuantType(256, 110, None, floats=_q3_k),
    "Q2_K": QuantType(256, 84, None, floats=_q2_k),
}


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Values (rows, K) uint8 below 2**bits -> MLX's packing (rows, K * bits / 32) uint32: each
    row one little-endian bit stream."""
    rows, k = q.shape
    if bits == 8:
        packed = np.ascontiguousarray(q)
    elif bits == 4:
        packed = q[:, 0::2] | (q[:, 1::2] << 4)
    else:  # 8 values -> `bits` bytes, through one little-endian 64-bit integer
        shifts = np.arange(0, 8 * bits, bits, dtype=np.uint64)
        words = np.bitwise_or.reduce(q.reshape(rows, k // 8, 8).astype(np.uint64) << shifts, -1)
        packed = np.ascontiguousarray(words.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :bits])
    return packed.reshape(rows, k * bits // 8).view("<u4")


def _compact(values: np.ndarray) -> bool:
    """Whether every value is a float16 exactly."""
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.array_equal(values.astype(np.float16).astype(np.float32), values))


def decode(data: np.ndarray, kind: str) -> Quantized | np.ndarray:
    """A GGUF tensor's blocks, (..., row bytes) uint8 as ``gguf.GGUFReader`` maps them, as MLX's
    affine quantization (the packed types) or as floats (..., K) (the 16-element types)."""
    spec = TYPES[kind]
    *lead, row_bytes = data.shape
    if row_bytes % spec.size:
        raise ValueError(f"a {kind} row of {row_bytes} bytes is not whole blocks")
    k = row_bytes // spec.size * spec.block
    flat = data.reshape(-1, row_bytes)
    rows = flat.shape[0]
    step = max(1, CHUNK_ELEMENTS // k)
    compact = True  # every scale and bias (or value) so far a float16 exactly
    if spec.floats is not None:
        floats = np.empty((rows, k), np.float32)
        for start in range(0, rows, step):
            chunk = spec.floats(_blocks(flat[start : start + step], spec.size)).reshape(-1, k)
            compact = compact and _compact(chunk)
            floats[start : start + step] = chunk
        return (floats.astype(np.float16) if compact else floats).reshape(*lead, k)
    assert spec.packed is not None and spec.bits is not None
    bits, groups = spec.bits, k // GROUP_SIZE
    weight = np.empty((rows, k * bits // 32), np.uint32)
    scales = np.empty((rows, groups), np.float32)
    biases = np.empty_like(scales)
    for start in range(0, rows, step):
        q, chunk_scales, chunk_biases = spec.packed(_blocks(flat[start : start + step], spec.size))
        weight[start : start + step] = pack(q.reshape(-1, k), bits)
        chunk_scales, chunk_biases = (
            chunk_scales.reshape(-1, groups),
            chunk_biases.reshape(-1, groups),
        )
        compact = compact and _compact(chunk_scales) and _compact(chunk_biases)
        scales[start : start + step] = chunk_scales
        biases[start : start + step] = chunk_biases
    if compact:
        scales, biases = scales.astype(np.float16), biases.astype(np.float16)
    return Quantized(
        weight.reshape(*lead, -1), scales.reshape(*lead, -1), biases.reshape(*lead, -1), bits
    )


def _blocks(rows: np.ndarray, size: int) -> np.ndarray:
    """Rows of blocks (read from the mapped file) -> (blocks, size) uint8 in memory."""
    return np.ascontiguousarray(rows, dtype=np.uint8).reshape(-1, size)
