"""GGUF writer: a GGUF v3 file from an ordered list of metadata entries and tensors.

Every file the project makes (requantize, the converters, the synthetic models) is written
here, packed with ``struct`` in the order given: magic, version, tensor and metadata counts,
the metadata, the tensor infos (ggml type id, dimensions in ggml order, data offset), padding
to ``general.alignment`` (default 32), then each tensor's bytes, padded likewise. Nothing is
reordered or deduplicated, so the same entries give the same bytes.

Metadata entries are ``KV(key, type, value, item_type)``, typed explicitly (a Python int could
be any of eight GGUF types), or ``RawKV`` pairs copied byte for byte from another GGUF
(``copy_kv``). Tensor data is one buffer or an iterable of buffers, so a large model can be
streamed slab by slab; the byte count is checked against the shape.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from pocketlm.gguf.reader import (DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_DIMS, NUMPY_DTYPES,
                                  SCALAR_FORMATS, GGUFFile)

GGUF_VERSION = 3
ProgressFn = Callable[[int, int], None]   # (tensors written, tensors total)

# short spellings of the value types, for metadata tables written by hand
TYPE_NAMES = {"u8": GGUFValueType.UINT8, "i8": GGUFValueType.INT8,
              "u16": GGUFValueType.UINT16, "i16": GGUFValueType.INT16,
              "u32": GGUFValueType.UINT32, "i32": GGUFValueType.INT32,
              "u64": GGUFValueType.UINT64, "i64": GGUFValueType.INT64,
              "f32": GGUFValueType.FLOAT32, "f64": GGUFValueType.FLOAT64,
              "bool": GGUFValueType.BOOL, "str": GGUFValueType.STRING,
              "array": GGUFValueType.ARRAY}


class KV(NamedTuple):
    """One metadata entry; ``type`` and ``item_type`` are ``GGUFValueType``s or ``TYPE_NAMES``."""

    key: str
    type: GGUFValueType | str
    value: Any
    item_type: GGUFValueType | str | None = None   # element type of an ARRAY


class RawKV(NamedTuple):
    """A metadata entry copied as stored: ``encoded`` is its type id and value."""

    key: str
    value: Any        # as the reader decoded it
    encoded: bytes


class Tensor(NamedTuple):
    """One tensor: ``shape`` in numpy order (rows last); ``data`` its raw bytes, as one buffer
    (bytes, ndarray) or an iterable of buffers written one after another."""

    name: str
    qtype: str
    shape: tuple[int, ...]
    data: Any


def copy_kv(src: GGUFFile, keep: Callable[[str], bool] = lambda key: True) -> list[RawKV]:
    """The metadata of ``src`` whose key passes ``keep``, in file order, with exact types."""
    return [RawKV(k, src.metadata[k], b) for k, b in src.raw_metadata() if keep(k)]


def _vtype(t, key: str) -> GGUFValueType:
    if isinstance(t, str) and t in TYPE_NAMES:
        return TYPE_NAMES[t]
    try:
        return GGUFValueType(t)
    except ValueError:
        raise ValueError(f"{key}: unknown GGUF value type {t!r}") from None


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(vtype: GGUFValueType, value, key: str) -> bytes:
    """The value's bytes (without its type id)."""
    try:
        if vtype in SCALAR_FORMATS:
            return struct.pack(SCALAR_FORMATS[vtype], value)
        if vtype == GGUFValueType.STRING:
            if not isinstance(value, str):
                raise TypeError
            return _string(value)
    except (struct.error, TypeError, OverflowError):
        raise ValueError(f"{key}: {value!r} is not a {vtype.name} value") from None
    raise ValueError(f"{key}: {vtype.name} is not a scalar value type")


def _array(etype: GGUFValueType, values, key: str) -> bytes:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise ValueError(f"{key}: {values!r} is not an array")
    head = struct.pack("<IQ", etype, len(values))
    if etype in NUMPY_DTYPES:
        try:
            a = np.asarray(values, dtype=NUMPY_DTYPES[etype])
            # floats round to the item type; integers and bools must survive the conversion
            ok = a.ndim == 1 and (a.dtype.kind == "f" or np.array_equal(a, np.asarray(values)))
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise ValueError(f"{key}: not a one-dimensional array of {etype.name} values")
        return head + a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
    if etype == GGUFValueType.STRING:
        return head + b"".join(_value(etype, v, key) for v in values)
    raise ValueError(f"{key}: arrays of {etype.name} are not supported")


def encode_kv(kv: KV | RawKV) -> bytes:
    """The entry as stored: key, type id, value."""
    if isinstance(kv, RawKV):
        return _string(kv.key) + kv.encoded
    key, t, value, item_type = KV(*kv)
    vtype = _vtype(t, key)
    if vtype == GGUFValueType.ARRAY:
        if item_type is None:
            raise ValueError(f"{key}: an array needs an item type")
        body = _array(_vtype(item_type, key), value, key)
    else:
        body = _value(vtype, value, key)
    return _string(key) + struct.pack("<I", vtype) + body


def _nbytes(t: Tensor) -> int:
    """Bytes of the tensor's data, from its type and shape (checked)."""
    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[t.qtype]]
    except KeyError:
        raise ValueError(f"tensor {t.name}: unknown ggml type {t.qtype!r}") from None
    shape = tuple(t.shape)
    if not 1 <= len(shape) <= MAX_DIMS or any(not isinstance(d, (int, np.integer)) or d <= 0
                                               for d in shape):
        raise ValueError(f"tensor {t.name}: invalid shape {shape} (1..{MAX_DIMS} positive dims)")
    if shape[-1] % block:
        raise ValueError(f"tensor {t.name}: row length {shape[-1]} is not a multiple of the "
                         f"{t.qtype} block size {block}")
    return int(np.prod(shape, dtype=np.int64)) // block * size


def _alignment(kvs: Sequence[KV | RawKV]) -> int:
    align = next((kv.value for kv in kvs if kv.key == "general.alignment"), DEFAULT_ALIGNMENT)
    if not isinstance(align, (int, np.integer)) or align <= 0 or align & (align - 1):
        raise ValueError(f"general.alignment {align!r} is not a power of two")
    return int(align)


def _chunks(data) -> Iterable:
    if isinstance(data, (bytes, bytearray, memoryview, np.ndarray)):
        return (data,)
    return data


def _buffer(chunk) -> memoryview:
    if isinstance(chunk, np.ndarray):
        chunk = np.ascontiguousarray(chunk)
    return memoryview(chunk).cast("B")


def write_gguf(path: str | os.PathLike, kvs: Sequence[KV | RawKV], tensors: Sequence[Tensor],
               progress: ProgressFn | None = None) -> Path:
    """Write a GGUF v3 file at ``path``: ``kvs`` then ``tensors``, each in the order given.

    Entries, types and shapes are checked before anything is written, a streamed tensor's
    byte count as it is written; a bad one raises a one-line ``ValueError``. The file appears
    under its final name only when complete (it is written as ``path.part``). ``progress(done, total)`` is called after each tensor.
    """
    path = Path(path)
    kvs, tensors = list(kvs), list(tensors)
    align = _alignment(kvs)
    header = bytearray(GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(kvs)))
    for kv in kvs:
        header += encode_kv(kv)
    sizes, offset, names = [], 0, set()
    for t in tensors:
        if t.name in names:
            raise ValueError(f"duplicate tensor name {t.name}")
        names.add(t.name)
        n = _nbytes(t)
        ne = tuple(reversed(t.shape))
        header += _string(t.name) + struct.pack(f"<I{len(ne)}Q", len(ne), *ne)
        header += struct.pack("<IQ", GGMLQuantizationType[t.qtype], offset)
        sizes.append(n)
        offset += n + -n % align
    header += bytes(-len(header) % align)
    if not path.parent.is_dir():
        raise ValueError(f"cannot write {path}: directory {path.parent} does not exist")

    tmp = path.with_name(path.name + ".part")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            for i, (t, n) in enumerate(zip(tensors, sizes)):
                written = 0
                for chunk in _chunks(t.data):
                    buf = _buffer(chunk)
                    written += buf.nbytes
                    if written > n:
                        break
                    f.write(buf)
                if written != n:
                    got = f"more than {n}" if written > n else str(written)
                    raise ValueError(f"tensor {t.name}: {got} bytes of data, but {t.qtype} "
                                     f"{tuple(t.shape)} takes {n}")
                f.write(bytes(-n % align))
                if progress is not None:
                    progress(i + 1, len(tensors))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
