"""One class per ggml block type, registered by type name.

Layouts and arithmetic follow ggml's ``ggml-quants.c``: ``dequantize_row_*`` for decoding and
``quantize_row_*_ref`` for encoding. Every float operation is done in float32 in the C order, so
results match ggml bit for bit (products of an fp16 scale and a small integer are exact, which
is why the order only matters where the C code rounds).
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

QK_K = 256

REGISTRY: dict[str, type["BlockType"]] = {}


class BlockType:
    """A block format: ``block_size`` elements stored in ``type_size`` bytes."""

    name: ClassVar[str]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    can_quantize: ClassVar[bool] = False

    def __init_subclass__(cls, name: str, block_size: int, type_size: int, **kw):
        super().__init_subclass__(**kw)
        cls.name, cls.block_size, cls.type_size = name, block_size, type_size
        cls.can_quantize = "quantize_blocks" in cls.__dict__
        REGISTRY[name] = cls

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """(n, type_size) uint8 -> (n, block_size) float32."""
        raise NotImplementedError

    @classmethod
    def quantize_blocks(cls, x: np.ndarray) -> np.ndarray:
        """(n, block_size) float32 -> (n, type_size) uint8."""
        raise NotImplementedError


# -- helpers ---------------------------------------------------------------------------------

def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 scale at byte ``at`` of each block, as float32 of shape (n, 1)."""
    return blocks[:, at:at + 2].view(np.float16).astype(np.float32)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """float32 (n, 1) -> its fp16 encoding (round to nearest even, as GGML_FP32_TO_FP16), (n, 2).

    Values beyond the fp16 range become inf, as in ggml; that is not worth a warning.
    """
    with np.errstate(over="ignore"):
        return v.astype(np.float16).view(np.uint8)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, k) packed bytes -> (n, 2k): low nibbles of all bytes, then high nibbles."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)


def _signed_absmax(x: np.ndarray) -> np.ndarray:
    """The value of largest magnitude per block, first one on ties, +0.0 for an all-zero block.

    Mirrors ggml's ``if (amax < fabsf(v)) { amax = fabsf(v); max = v; }`` starting from 0.
    """
    i = np.abs(x).argmax(axis=1)[:, None]
    m = np.take_along_axis(x, i, axis=1)
    return np.where(m == 0, np.float32(0), m)


def _first_min_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-block min and max as ggml's strict-comparison loop finds them (first occurrence)."""
    mn = np.take_along_axis(x, x.argmin(axis=1)[:, None], axis=1)
    mx = np.take_along_axis(x, x.argmax(axis=1)[:, None], axis=1)
    return mn, mx


def _inverse(d: np.ndarray) -> np.ndarray:
    """``d ? 1.0f/d : 0.0f`` in float32."""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d)


def _roundf(v: np.ndarray) -> np.ndarray:
    """C ``roundf`` (half away from zero) for float32; ``np.round`` would round half to even.

    ``v - trunc(v)`` and its double are exact, so no add of 0.5 can round up by accident.
    """
    t = np.trunc(v)
    return t + np.trunc(np.float32(2) * (v - t))


# -- plain floats ----------------------------------------------------------------------------

class F32(BlockType, name="F32", block_size=1, type_size=4):
    @classmethod
    def dequantize_blocks(cls, blocks):
        return blocks.view(np.float32)

    @classmethod
    def quantize_blocks(cls, x):
        return x.view(np.uint8)


class F16(BlockType, name="F16", block_size=1, type_size=2):
    @classmethod
    def dequantize_blocks(cls, blocks):
        return blocks.view(np.float16).astype(np.float32)

    @classmethod
    def quantize_blocks(cls, x):
        return _f16_bytes(x)


class BF16(BlockType, name="BF16", block_size=1, type_size=2):
    @classmethod
    def dequantize_blocks(cls, blocks):
        return (blocks.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)

    @classmethod
    def quantize_blocks(cls, x):
        # ggml_compute_fp32_to_bf16: NaN is made quiet, everything else rounds to nearest even.
        u = x.view(np.uint32).astype(np.uint64)
        rounded = (u + (np.uint64(0x7FFF) + ((u >> np.uint64(16)) & np.uint64(1)))) >> np.uint64(16)
        nan = (u & np.uint64(0x7FFFFFFF)) > np.uint64(0x7F800000)
        quiet = (u >> np.uint64(16)) | np.uint64(64)
        return np.where(nan, quiet, rounded).astype(np.uint16).view(np.uint8)


# -- 32-element blocks -----------------------------------------------------------------------

class Q4_0(BlockType, name="Q4_0", block_size=32, type_size=18):
    # d: f16, qs[16]: element j in the low nibble of byte j, element j+16 in its high nibble
    @classmethod
    def dequantize_blocks(cls, blocks):
        d = _f16(blocks, 0)
        q = _nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)
        return d * q.astype(np.float32)

    @classmethod
    def quantize_blocks(cls, x):
        d = _signed_absmax(x) / np.float32(-8)
        q = np.trunc(x * _inverse(d) + np.float32(8.5))
        q = np.minimum(q.astype(np.int8), 15).astype(np.uint8)
        out = np.empty((x.shape[0], cls.type_size), np.uint8)
        out[:, 0:2] = _f16_bytes(d)
        out[:, 2:] = q[:, :16] | (q[:, 16:] << np.uint8(4))
        return out


class Q4_1(BlockType, name="Q4_1", block_size=32, type_size=20):
    # d: f16, m: f16, qs[16]; value = q*d + m
    @classmethod
    def dequantize_blocks(cls, blocks):
        d, m = _f16(blocks, 0), _f16(blocks, 2)
        return d * _nibbles(blocks[:, 4:]).astype(np.float32) + m

    @classmethod
    def quantize_blocks(cls, x):
        mn, mx = _first_min_max(x)
        d = (mx - mn) / np.float32(15)
        q = np.trunc((x - mn) * _inverse(d) + np.float32(0.5))
        q = np.minimum(q.astype(np.int8), 15).astype(np.uint8)
        out = np.empty((x.shape[0], cls.type_size), np.uint8)
        out[:, 0:2] = _f16_bytes(d)
        out[:, 2:4] = _f16_bytes(mn)
        out[:, 4:] = q[:, :16] | (q[:, 16:] << np.uint8(4))
        return out


def _pack5(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """5-bit values (n, 32) -> qh (n, 4: bit j of a little-endian u32 = bit 4 of element j)
    and qs (n, 16: low nibbles of elements j and j+16)."""
    qh = np.packbits(q >> np.uint8(4), axis=1, bitorder="little")
    qs = (q[:, :16] & np.uint8(0x0F)) | ((q[:, 16:] & np.uint8(0x0F)) << np.uint8(4))
    return qh, qs


def _unpack5(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    return _nibbles(qs) | (np.unpackbits(qh, axis=1, bitorder="little") << np.uint8(4))


class Q5_0(BlockType, name="Q5_0", block_size=32, type_size=22):
    # d: f16, qh: u32 (fifth bits), qs[16]
    @classmethod
    def dequantize_blocks(cls, blocks):
        d = _f16(blocks, 0)
        q = _unpack5(blocks[:, 2:6], blocks[:, 6:]).astype(np.int8) - np.int8(16)
        return d * q.astype(np.float32)

    @classmethod
    def quantize_blocks(cls, x):
        d = _signed_absmax(x) / np.float32(-16)
        q = np.trunc(x * _inverse(d) + np.float32(16.5))
        q = np.minimum(q.astype(np.int8), 31).astype(np.uint8)
        out = np.empty((x.shape[0], cls.type_size), np.uint8)
        out[:, 0:2] = _f16_bytes(d)
        out[:, 2:6], out[:, 6:] = _pack5(q)
        return out


class Q5_1(BlockType, name="Q5_1", block_size=32, type_size=24):
    # d: f16, m: f16, qh: u32, qs[16]; value = q*d + m
    @classmethod
    def dequantize_blocks(cls, blocks):
        d, m = _f16(blocks, 0), _f16(blocks, 2)
        return d * _unpack5(blocks[:, 4:8], blocks[:, 8:]).astype(np.float32) + m

    @classmethod
    def quantize_blocks(cls, x):
        mn, mx = _first_min_max(x)
        d = (mx - mn) / np.float32(31)
        q = np.trunc((x - mn) * _inverse(d) + np.float32(0.5))
        # no MIN(31) in the C code: (uint8_t) keeps the low bits, of which 5 are stored
        q = q.astype(np.uint8) & np.uint8(0x1F)
        out = np.empty((x.shape[0], cls.type_size), np.uint8)
        out[:, 0:2] = _f16_bytes(d)
        out[:, 2:4] = _f16_bytes(mn)
        out[:, 4:8], out[:, 8:] = _pack5(q)
        return out


class Q8_0(BlockType, name="Q8_0", block_size=32, type_size=34):
    # d: f16, qs[32]: int8
    @classmethod
    def dequantize_blocks(cls, blocks):
        return blocks[:, 2:].view(np.int8).astype(np.float32) * _f16(blocks, 0)

    @classmethod
    def quantize_blocks(cls, x):
        d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
        q = _roundf(x * _inverse(d))
        out = np.empty((x.shape[0], cls.type_size), np.uint8)
        out[:, 0:2] = _f16_bytes(d)
        out[:, 2:] = q.astype(np.int8).view(np.uint8)
        return out


# ggml's kvalues_mxfp4: E2M1 values doubled (the block scale is halved to match)
MXFP4_VALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int8)


def e8m0_half(e: np.ndarray) -> np.ndarray:
    """An E8M0 scale byte as float32 halved (GGML_E8M0_TO_FP32_HALF): 2**(e - 128), with
    ggml's subnormal bit patterns for e = 0, 1."""
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - np.uint32(1)) << np.uint32(23))
    return bits.astype(np.uint32).view(np.float32)


class MXFP4(BlockType, name="MXFP4", block_size=32, type_size=17):
    # e: E8M0 shared exponent, qs[16]: 4-bit codes into MXFP4_VALUES, element j in the low
    # nibble of byte j, element j+16 in its high nibble (as Q4_0)
    @classmethod
    def dequantize_blocks(cls, blocks):
        q = MXFP4_VALUES[_nibbles(blocks[:, 1:])].astype(np.float32)
        return q * e8m0_half(blocks[:, 0:1])

    @classmethod
    def quantize_blocks(cls, x):
        amax = np.abs(x).max(axis=1, keepdims=True)
        # log2f correctly rounded to float32, then floored, as the C reference
        with np.errstate(divide="ignore"):
            lg = np.floor(np.log2(amax.astype(np.float64)).astype(np.float32))
        e = np.where(amax > 0, np.clip(lg - 2 + 127, 0, 255), 0).astype(np.uint8)
        d = e8m0_half(e)                                                     # (n, 1)
        # best_index_mxfp4: the first code of least |value * d - x|
        err = np.abs(MXFP4_VALUES.astype(np.float32) * d[:, :, None] - x[:, :, None])
        q = err.argmin(axis=2).astype(np.uint8)                              # (n, 32)
        out = np.empty((x.shape[0], cls.type_size), np.uint8)
        out[:, 0:1] = e
        out[:, 1:] = q[:, :16] | (q[:, 16:] << np.uint8(4))
        return out


# -- 256-element super-blocks (K-quants) -----------------------------------------------------

_SHIFT2 = np.array([0, 2, 4, 6], dtype=np.uint8)
_SHIFT4 = np.array([0, 4], dtype=np.uint8)


def _scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12-byte 6-bit scales/mins of Q4_K/Q5_K (ggml's get_scale_min_k4), (n, 8) each."""
    sc = np.concatenate([s[:, 0:4] & np.uint8(63),
                         (s[:, 8:12] & np.uint8(0x0F)) | ((s[:, 0:4] >> np.uint8(6)) << np.uint8(4))],
                        axis=1)
    mn = np.concatenate([s[:, 4:8] & np.uint8(63),
                         (s[:, 8:12] >> np.uint8(4)) | ((s[:, 4:8] >> np.uint8(6)) << np.uint8(4))],
                        axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


class Q2_K(BlockType, name="Q2_K", block_size=QK_K, type_size=84):
    # scales[16] (low nibble scale, high nibble min), qs[64], d: f16, dmin: f16
    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        sc = blocks[:, 0:16]
        d, dmin = _f16(blocks, 80), _f16(blocks, 82)
        dl = (d * (sc & np.uint8(0x0F)).astype(np.float32))[:, :, None]   # (n, 16, 1)
        ml = (dmin * (sc >> np.uint8(4)).astype(np.float32))[:, :, None]
        # element h*128 + j*32 + l sits in byte h*32 + l at bit 2j
        q = (blocks[:, 16:80].reshape(n, 2, 1, 32) >> _SHIFT2.reshape(1, 1, 4, 1)) & np.uint8(3)
        return (dl * q.reshape(n, 16, 16).astype(np.float32) - ml).reshape(n, QK_K)


class Q3_K(BlockType, name="Q3_K", block_size=QK_K, type_size=110):
    # hmask[32], qs[64], scales[12] (16 six-bit scales), d: f16
    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        s = blocks[:, 96:108]
        lo = np.concatenate([s[:, 0:8] & np.uint8(0x0F), s[:, 0:8] >> np.uint8(4)], axis=1)
        hi = ((s[:, None, 8:12] >> _SHIFT2.reshape(1, 4, 1)) & np.uint8(3)).reshape(n, 16)
        scale = (lo | (hi << np.uint8(4))).astype(np.int8) - np.int8(32)
        dl = (_f16(blocks, 108) * scale.astype(np.float32))[:, :, None]    # (n, 16, 1)
        ql = (blocks[:, 32:96].reshape(n, 2, 1, 32) >> _SHIFT2.reshape(1, 1, 4, 1)) & np.uint8(3)
        # the high bit of element h*128 + j*32 + l is bit (4h + j) of hmask[l]; a clear bit means -4
        hbit = (blocks[:, None, None, 0:32] >> np.arange(8, dtype=np.uint8).reshape(1, 2, 4, 1)) & np.uint8(1)
        q = ql.astype(np.int8) - ((hbit ^ np.uint8(1)) << np.uint8(2)).astype(np.int8)
        return (dl * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


class Q4_K(BlockType, name="Q4_K", block_size=QK_K, type_size=144):
    # d: f16, dmin: f16, scales[12], qs[128]
    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        sc, mn = _scale_min_k4(blocks[:, 4:16])
        d = (_f16(blocks, 0) * sc)[:, :, None]                                # (n, 8, 1)
        m = (_f16(blocks, 2) * mn)[:, :, None]
        q = (blocks[:, 16:].reshape(n, 4, 1, 32) >> _SHIFT4.reshape(1, 1, 2, 1)) & np.uint8(0x0F)
        return (d * q.reshape(n, 8, 32).astype(np.float32) - m).reshape(n, QK_K)


class Q5_K(BlockType, name="Q5_K", block_size=QK_K, type_size=176):
    # d: f16, dmin: f16, scales[12], qh[32], qs[128]
    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        sc, mn = _scale_min_k4(blocks[:, 4:16])
        d = (_f16(blocks, 0) * sc)[:, :, None]
        m = (_f16(blocks, 2) * mn)[:, :, None]
        ql = (blocks[:, 48:].reshape(n, 4, 1, 32) >> _SHIFT4.reshape(1, 1, 2, 1)) & np.uint8(0x0F)
        qh = (blocks[:, None, 16:48] >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & np.uint8(1)
        q = ql.reshape(n, 8, 32) | (qh << np.uint8(4))
        return (d * q.astype(np.float32) - m).reshape(n, QK_K)


class Q6_K(BlockType, name="Q6_K", block_size=QK_K, type_size=210):
    # ql[128], qh[64], scales[16]: int8, d: f16
    @classmethod
    def dequantize_blocks(cls, blocks):
        n = blocks.shape[0]
        # element h*128 + k*32 + l: low 4 bits in ql[h*64 + (k%2)*32 + l] at bit 4*(k//2),
        # high 2 bits in qh[h*32 + l] at bit 2k
        lo = (blocks[:, 0:128].reshape(n, 2, 1, 2, 32) >> _SHIFT4.reshape(1, 1, 2, 1, 1)) & np.uint8(0x0F)
        hi = (blocks[:, 128:192].reshape(n, 2, 1, 32) >> _SHIFT2.reshape(1, 1, 4, 1)) & np.uint8(3)
        q = (lo.reshape(n, 2, 4, 32) | (hi << np.uint8(4))).astype(np.int8) - np.int8(32)
        d = (_f16(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32))[:, :, None]
        return (d * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


class Q8_K(BlockType, name="Q8_K", block_size=QK_K, type_size=292):
    # d: f32, qs[256]: int8, bsums[16]: int16 (sums of 16 qs, used by dot products only)
    @classmethod
    def dequantize_blocks(cls, blocks):
        return blocks[:, 0:4].view(np.float32) * blocks[:, 4:260].view(np.int8).astype(np.float32)

    @classmethod
    def quantize_blocks(cls, x):
        n = x.shape[0]
        mx = _signed_absmax(x)
        zero = mx == 0
        with np.errstate(divide="ignore"):
            iscale = np.where(zero, np.float32(0), np.float32(-127) / mx)
        # nearest_int() is round-half-even for |v| < 2**22, i.e. np.rint in float32
        q = np.minimum(np.rint(iscale * x), 127).astype(np.int8)
        with np.errstate(divide="ignore"):
            d = np.where(zero, np.float32(0), np.float32(1) / iscale)
        out = np.empty((n, cls.type_size), np.uint8)
        out[:, 0:4] = d.astype(np.float32).view(np.uint8)
        out[:, 4:260] = q.view(np.uint8)
        bsums = q.reshape(n, 16, 16).sum(axis=2, dtype=np.int16)
        out[:, 260:] = bsums.astype("<i2").view(np.uint8)
        return out
