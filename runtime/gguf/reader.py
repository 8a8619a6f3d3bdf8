"""GGUF reader: validated metadata, tensor index and zero-copy memory-mapped weights.

The header is parsed here (not with ``gguf.GGUFReader``) so that every length read from the
file is checked against the bytes that remain before anything is allocated: a hostile file
gets a one-line ``GGUFError``, never a huge allocation, a hang or a traceback from deep inside.
Type numbers and block sizes come from the ``gguf`` package.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_KV = 1 << 20
MAX_TENSORS = 1 << 20
MAX_STRING = 1 << 30

SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.FLOAT64: "<d",
    GGUFValueType.BOOL: "<?",
}
NUMPY_DTYPES = {
    GGUFValueType.UINT8: np.uint8, GGUFValueType.INT8: np.int8,
    GGUFValueType.UINT16: np.uint16, GGUFValueType.INT16: np.int16,
    GGUFValueType.UINT32: np.uint32, GGUFValueType.INT32: np.int32,
    GGUFValueType.UINT64: np.uint64, GGUFValueType.INT64: np.int64,
    GGUFValueType.FLOAT32: np.float32, GGUFValueType.FLOAT64: np.float64,
    GGUFValueType.BOOL: np.bool_,
}


class GGUFError(ValueError):
    """A GGUF file is malformed or unsupported; the message names the file and the problem."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the index. ``shape`` is numpy order (``ne`` reversed): rows last-contiguous."""

    name: str
    qtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def type_name(type_id: int) -> str:
    return GGMLQuantizationType(type_id).name


def row_nbytes(qtype: str, n: int) -> int:
    """Bytes taken by ``n`` consecutive elements of ``qtype`` (n must fill whole blocks)."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    return (n // block) * size


def one_line(msg: str, limit: int = 400) -> str:
    """``msg`` with control characters escaped and cut to ``limit``: names read from a hostile
    file may hold newlines or run for megabytes."""
    msg = re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], msg)
    return msg if len(msg) <= limit else msg[:limit - 3] + "..."


def name_file(e: ValueError, path: str | os.PathLike) -> ValueError:
    """``e`` as one line naming the file ``path`` (prefixed unless it already does)."""
    msg = str(e) if str(path) in str(e) else f"{path}: {e}"
    e.args = (one_line(msg),)
    return e


@contextlib.contextmanager
def naming_file(path: str | os.PathLike):
    """ValueErrors raised inside name the file ``path``."""
    try:
        yield
    except ValueError as e:
        raise name_file(e, path)


class _Cursor:
    def __init__(self, buf, size: int, path: str):
        self.buf, self.size, self.pos, self.path = buf, size, 0, path

    def fail(self, msg: str):
        raise GGUFError(one_line(f"{self.path}: {msg}"))

    def need(self, n: int, what: str):
        if n < 0 or self.pos + n > self.size:
            self.fail(f"truncated file: {what} needs {n} bytes at offset {self.pos}, "
                      f"file has {self.size}")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        if n > MAX_STRING:
            self.fail(f"absurd string length {n} in {what}")
        self.need(n, what)
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", "surrogateescape")
        self.pos += n
        return s

    def value(self, vtype: int, what: str, depth: int = 0):
        try:
            vt = GGUFValueType(vtype)
        except ValueError:
            self.fail(f"unknown metadata value type {vtype} in {what}")
        if vt == GGUFValueType.STRING:
            return self.string(what)
        if vt in SCALAR_FORMATS:
            return self.unpack(SCALAR_FORMATS[vt], what)
        # array
        if depth > 2:
            self.fail(f"arrays nested too deeply in {what}")
        etype = self.unpack("<I", what)
        count = self.unpack("<Q", what)
        try:
            et = GGUFValueType(etype)
        except ValueError:
            self.fail(f"unknown array element type {etype} in {what}")
        if et in NUMPY_DTYPES:
            itemsize = np.dtype(NUMPY_DTYPES[et]).itemsize
            if count > (self.size - self.pos) // itemsize:
                self.fail(f"absurd metadata: {what} claims {count} entries, more than the file holds")
            arr = np.frombuffer(self.buf, dtype=NUMPY_DTYPES[et], count=count,
                                offset=self.pos).copy()
            self.pos += count * itemsize
            return arr
        # strings and nested arrays take at least 8 bytes an entry
        if count > (self.size - self.pos) // 8:
            self.fail(f"absurd metadata: {what} claims {count} entries, more than the file holds")
        if et == GGUFValueType.STRING:
            return self._strings(count, what)
        return [self.value(et, what, depth + 1) for _ in range(count)]

    def _strings(self, count: int, what: str) -> list[str]:
        # a vocabulary is 100k+ strings: the loop keeps to local names and slices the mmap
        # (bytes already) without another copy
        buf, pos, size = self.buf, self.pos, self.size
        out = []
        append = out.append
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, what)
            (n,) = unpack(buf, pos)
            pos += 8
            if n > size - pos:
                self.pos = pos
                self.fail(f"truncated file: string in {what} runs past the end")
            append(buf[pos:pos + n].decode("utf-8", "surrogateescape"))
            pos += n
        self.pos = pos
        return out


class GGUFFile:
    """An open GGUF file: ``metadata`` dict, ``tensors`` index, zero-copy ``raw(name)`` views.

    Numeric metadata arrays are numpy arrays, string arrays are ``list[str]``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot open ({e.strerror})") from None
        try:
            self.file_size = os.fstat(fd).st_size
            if self.file_size < 24:
                raise GGUFError(f"{self.path}: not a GGUF file (only {self.file_size} bytes)")
            self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        try:
            self._parse()
        except GGUFError:
            self.close()
            raise

    def _parse(self):
        cur = _Cursor(self._mm, self.file_size, self.path)
        magic = bytes(self._mm[:4])
        if magic != GGUF_MAGIC:
            cur.fail(f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
        cur.pos = 4
        version = cur.unpack("<I", "version")
        if version not in SUPPORTED_VERSIONS:
            if struct.unpack("<I", struct.pack(">I", version))[0] in SUPPORTED_VERSIONS:
                cur.fail("big-endian GGUF files are not supported")
            cur.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
        self.version = version
        n_tensors = cur.unpack("<Q", "tensor count")
        n_kv = cur.unpack("<Q", "metadata count")
        if n_tensors > MAX_TENSORS or n_tensors > self.file_size // 24:
            cur.fail(f"absurd tensor count {n_tensors}")
        if n_kv > MAX_KV or n_kv > self.file_size // 12:
            cur.fail(f"absurd metadata count {n_kv}")

        meta: dict[str, Any] = {}
        spans: dict[str, tuple[int, int]] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            start = cur.pos
            vtype = cur.unpack("<I", f"type of {key}")
            meta[key] = cur.value(vtype, key)
            spans[key] = (start, cur.pos)
        self.metadata = meta
        self._kv_spans = spans

        align = meta.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1) or align > 1 << 20:
            cur.fail(f"invalid general.alignment {align!r}")
        self.alignment = align

        raw_infos = []
        for i in range(n_tensors):
            name = cur.string(f"tensor name #{i}")
            n_dims = cur.unpack("<I", f"dims of {name}")
            if n_dims == 0 or n_dims > MAX_DIMS:
                cur.fail(f"tensor {name} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
            ne = [cur.unpack("<Q", f"shape of {name}") for _ in range(n_dims)]
            type_id = cur.unpack("<I", f"type of {name}")
            offset = cur.unpack("<Q", f"offset of {name}")
            raw_infos.append((name, ne, type_id, offset))

        data_start = -(-cur.pos // align) * align
        self.data_offset = data_start
        tensors: dict[str, TensorInfo] = {}
        for name, ne, type_id, offset in raw_infos:
            if name in tensors:
                cur.fail(f"duplicate tensor name {name}")
            try:
                qt = GGMLQuantizationType(type_id)
                block, tsize = GGML_QUANT_SIZES[qt]
            except (ValueError, KeyError):
                cur.fail(f"tensor {name} has unknown type {type_id}")
            n = 1
            for d in ne:
                if d <= 0 or d > 1 << 40:
                    cur.fail(f"tensor {name} has invalid shape {ne}")
                n *= d
            if n > 1 << 44:
                cur.fail(f"tensor {name} has absurd size {ne}")
            if ne[0] % block:
                cur.fail(f"tensor {name}: row length {ne[0]} is not a multiple of the "
                         f"{qt.name} block size {block}")
            nbytes = n // block * tsize
            if offset % align:
                cur.fail(f"tensor {name}: data offset {offset} is not aligned to {align}")
            start = data_start + offset
            if start + nbytes > self.file_size:
                cur.fail(f"tensor {name}: data [{start}, {start + nbytes}) lies outside the file "
                         f"({self.file_size} bytes; truncated?)")
            tensors[name] = TensorInfo(name, qt.name, tuple(reversed(ne)), start, nbytes)
        # Overlapping data means the shapes do not match the bytes actually laid out.
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
        for (s0, e0, n0), (s1, _e1, n1) in zip(spans, spans[1:]):
            if s1 < e0:
                cur.fail(f"tensors {n0} and {n1} overlap: their shapes do not match the data layout")
        self.tensors = tensors

    # -- accessors -------------------------------------------------------------------------
    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def get(self, key: str, default=None):
        """Metadata lookup; ``{arch}.`` in the key is replaced by the architecture string."""
        return self.metadata.get(key.replace("{arch}", self.arch), default)

    def raw_metadata(self) -> list[tuple[str, bytes]]:
        """Each metadata pair as (key, its encoded type id and value), in file order.

        Copying these bytes keeps every value's exact GGUF type, which ``metadata`` does not.
        """
        return [(k, bytes(self._mm[s:e])) for k, (s, e) in self._kv_spans.items()]

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the mapped file, shape (rows, row_bytes)."""
        t = self.tensors[name]
        flat = np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        return flat.reshape(-1, row_nbytes(t.qtype, t.shape[-1]))

    def tensor(self, name: str):
        """The tensor as a ``runtime.tensor.QTensor`` (zero-copy)."""
        from pocketlm.gguf.tensor import QTensor
        t = self.tensors[name]
        return QTensor(t.qtype, t.shape, self.raw(name))

    def close(self):
        mm, self._mm = getattr(self, "_mm", None), None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # views still alive; the map is released when they are collected

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    if not Path(path).is_file():
        raise GGUFError(f"{path}: no such file")
    return GGUFFile(path)
