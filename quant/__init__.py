"""ggml block formats: dequantize and quantize raw GGUF tensor data with plain numpy.

Each block type is one class registered under its ggml name (``"Q4_0"``, ``"Q6_K"``, ...) with
``block_size`` (elements per block), ``type_size`` (bytes per block), ``dequantize_blocks`` and,
where implemented, ``quantize_blocks``. Results are bit-exact with ggml's reference (scalar) C
code: dequantization does the same float32 operations in the same order, and quantization
reproduces ``quantize_row_*_ref`` byte for byte.
"""
from __future__ import annotations

import numpy as np

from pocketlm.quant.blocks import REGISTRY, BlockType

__all__ = ["QTYPES", "QUANTIZE_QTYPES", "BlockType", "block_type", "block_size", "type_size",
           "row_bytes", "dequantize", "quantize"]

QTYPES: tuple[str, ...] = tuple(REGISTRY)
"""Type names that ``dequantize`` supports."""
QUANTIZE_QTYPES: tuple[str, ...] = tuple(n for n, t in REGISTRY.items() if t.can_quantize)
"""Type names that ``quantize`` supports."""

# Blocks per numpy pass: large enough to amortise Python overhead, small enough that the
# float temporaries stay in the tens of megabytes.
_CHUNK_ELEMS = 1 << 21


def block_type(qtype: str) -> type[BlockType]:
    """The block class registered for ``qtype``; ``ValueError`` for an unknown name."""
    try:
        return REGISTRY[qtype]
    except KeyError:
        raise ValueError(f"unsupported tensor type {qtype!r} (supported: {', '.join(QTYPES)})") from None


def block_size(qtype: str) -> int:
    """Elements per block (1 for F32/F16/BF16, 32 for Q4_0..Q8_0, 256 for K-quants)."""
    return block_type(qtype).block_size


def type_size(qtype: str) -> int:
    """Bytes per block."""
    return block_type(qtype).type_size


def row_bytes(qtype: str, n: int) -> int:
    """Bytes taken by a row of ``n`` elements; ``n`` must be a multiple of the block size."""
    bt = block_type(qtype)
    if n % bt.block_size:
        raise ValueError(f"row length {n} is not a multiple of the {qtype} block size {bt.block_size}")
    return n // bt.block_size * bt.type_size


def dequantize(qtype: str, raw: bytes | np.ndarray, shape) -> np.ndarray:
    """Decode raw ``qtype`` data into a new float32 array of ``shape`` (numpy order).

    ``raw`` is the tensor's bytes (any shape of uint8, or a bytes-like object) holding exactly
    ``prod(shape[:-1])`` rows of ``row_bytes(qtype, shape[-1])`` bytes.
    """
    bt = block_type(qtype)
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape, dtype=np.int64))
    if shape and shape[-1] % bt.block_size:
        raise ValueError(f"row length {shape[-1]} is not a multiple of the {qtype} block size "
                         f"{bt.block_size}")
    buf = np.frombuffer(raw, dtype=np.uint8) if not isinstance(raw, np.ndarray) else raw
    buf = np.ascontiguousarray(buf).reshape(-1)
    if buf.dtype != np.uint8:
        buf = buf.view(np.uint8)
    n_blocks = n // bt.block_size
    if buf.size != n_blocks * bt.type_size:
        raise ValueError(f"{qtype} data of shape {shape} needs {n_blocks * bt.type_size} bytes, "
                         f"got {buf.size}")
    blocks = buf.reshape(n_blocks, bt.type_size)
    out = np.empty((n_blocks, bt.block_size), dtype=np.float32)
    step = max(1, _CHUNK_ELEMS // bt.block_size)
    for i in range(0, n_blocks, step):
        out[i:i + step] = bt.dequantize_blocks(blocks[i:i + step])
    return out.reshape(shape)


def quantize(qtype: str, x: np.ndarray) -> np.ndarray:
    """Encode float32 ``x`` as ``qtype`` with ggml's reference quantizer.

    Returns uint8 of shape ``(*x.shape[:-1], row_bytes(qtype, x.shape[-1]))``, byte-identical to
    llama.cpp's ``quantize_row_<type>_ref`` applied to each row.
    """
    bt = block_type(qtype)
    if not bt.can_quantize:
        raise ValueError(f"quantizing to {qtype} is not implemented (supported: "
                         f"{', '.join(QUANTIZE_QTYPES)})")
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError("cannot quantize a scalar")
    x = np.ascontiguousarray(x, dtype=np.float32)
    nbytes_row = row_bytes(qtype, x.shape[-1])
    n_blocks = x.size // bt.block_size
    blocks = x.reshape(n_blocks, bt.block_size)
    out = np.empty((n_blocks, bt.type_size), dtype=np.uint8)
    step = max(1, _CHUNK_ELEMS // bt.block_size)
    for i in range(0, n_blocks, step):
        out[i:i + step] = bt.quantize_blocks(blocks[i:i + step])
    return out.reshape(*x.shape[:-1], nbytes_row)
