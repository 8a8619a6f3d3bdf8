"""Numba CPU kernels: quantized matvec/matmul with llama.cpp's numerics, and the small ops.

Weights stay in their raw ggml blocks (``QTensor.data``, uint8 (rows, row_bytes)). Which
kernel serves a weight is looked up in one registry keyed by (numerics, qtype):

- numerics "llama" (default): decode (``matvec``, and ``matmul`` below ``PREPARED_MAX_ROWS``
  rows) quantizes the activation once per call to the weight type's vec_dot type (Q8_0, Q8_1
  or Q8_K), takes exact integer block dot products and accumulates blocks in f32, as
  llama.cpp's x86 CPU path does: on AVX2 hosts by the LLVM IR kernels of ``_simd``
  (Q4_0/Q4_1/Q5_0/Q8_0/Q4_K/Q6_K; ``matmul_many`` serves several weights sharing an input in
  one call, ``experts_decode`` a layer's gated experts), elsewhere by the portable Numba drivers
  of ``_quant``. Results sit about 0.2-0.4 logits from exact math, as llama.cpp's do.
- numerics "exact": activations stay float32 and Q4_0/Q4_1/Q8_0/MXFP4 weights are
  dequantized in registers, so results sit within float32 rounding of exact math; other
  types keep the 8-bit path.

Larger batches (prefill) dequantize weight row tiles to f32 and multiply with numpy's BLAS
under either numerics (several times faster than the integer path at prefill sizes; weights
exact, activations float32); with ``round_x`` the activations are first rounded to the
vec_dot type (``llama_activations``), which gives llama.cpp's integer products to float32
rounding.
``matmul(..., method="quant")`` runs the integer path.

Q4_0/Q4_1/Q8_0 with 8-bit activations outside the AVX2 kernels read their f16 block scales
from float32 side arrays made once per weight: a ``Prepared`` record attached to the QTensor on first use
(``prepare(w)``), so a weight's data must not be modified in place afterwards; a refilled
buffer gets a new QTensor. Extra memory: 4 bytes per 32 weights (8 for Q4_1).

Importing this package reads and writes nothing: Numba's on-disk cache is chosen by
``_jit`` from file names and stamps. ``warmup()`` compiles (or loads) every kernel and
returns the seconds it took. ``set_threads(n)`` sets the worker count for kernels called
from the current thread.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import numba
import numpy as np
from numba import types

from pocketlm import quant
from pocketlm.gguf.tensor import QTensor

from . import _jit  # noqa: F401  (before the kernel modules below are decorated)
from . import _base, _float, _ops, _quant, _simd  # noqa: E402
from ._base import block_codegen  # noqa: E402
from ._pool import parallel_for  # noqa: E402

NUMERICS = ("llama", "exact")
_FLOAT_TYPES = ("F32", "F16", "BF16")

# qtype -> (integer/float driver, dequantizer)
_DRIVERS = {
    "F32": (_float.mm_f32, _float.deq_f32),
    "F16": (_float.mm_f16, _float.deq_f16),
    "BF16": (_float.mm_bf16, _float.deq_bf16),
    **{q: (getattr(_quant, "mm_" + q.lower()), getattr(_quant, "deq_" + q.lower()))
       for q in _quant.NAMES},
}
QTYPES = tuple(_DRIVERS)
# Q4_0/Q4_1/Q8_0: byte offsets of the f16 fields a prepared weight keeps as float32 (d, m);
# MXFP4 has a float-activation kernel too but reads its byte scales through a table
_SCALE_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q8_0": (0,), "MXFP4": ()}

_W = types.Array(types.uint8, 2, "C", readonly=True)     # writable arrays convert to this
_X = types.Array(types.float32, 2, "C", readonly=True)
_O = types.Array(types.float32, 2, "C")
_S = types.Array(types.float32, 2, "C", readonly=True)
_IDX = types.Array(types.int64, 1, "C", readonly=True)
_O1 = types.Array(types.float32, 1, "C")
_MM_SIG = (_W, _X, _O)
_DEQ_SIG = (_W, types.int64, types.int64, _O)
_MV_SIG = (_W, _S, _S, _X, _O)
_MVF_SIG = (_W, _X, _O)
_MVF_ROWS_SIG = (_W, _X, _IDX, _O1)

# Small batches of prepared weights run the matvec drivers row by row up to this many rows;
# above it dequantize + BLAS amortizes its fixed cost (crossover measured at 16 rows on
# 576x576 .. 1536x1536 Q4_0 matrices, with BLAS single-threaded as below).
PREPARED_MAX_ROWS = 16
# Prefill: below this many activation rows the integer path wins over dequantize + BLAS.
BLAS_MIN_ROWS = 8
_TILE_BYTES = 1 << 21   # f32 weight tile size for the BLAS path: stays in L2/L3
# Float weights this small (MoE routers) are multiplied on the calling thread: a parallel
# region costs more than the work, and stalls whenever another thread (expert I/O) holds
# one of its cores (SmallThinker router: 0.77 ms a call under a 2 GiB budget, 30 us serial).
SERIAL_MAX_BYTES = 1 << 18

_compiled: dict = {}   # (what, qtype) -> compiled dispatcher


def _once(key, make, sig, blocky=True):
    """The dispatcher ``make()`` gives, compiled for ``sig`` once (block kernels under the
    block codegen settings), then refusing any other signature: Numba would otherwise
    compile another specialization for arguments that only convert to ``sig`` (writable
    arrays), outside those settings."""
    got = _compiled.get(key)
    if got is None:
        got = make()
        if blocky:
            with block_codegen():
                got.compile(sig)
        else:
            got.compile(sig)
        got.disable_compile()
        _compiled[key] = got
    return got


def _driver(qtype: str):
    if qtype not in _DRIVERS:
        raise NotImplementedError(f"no kernel for weight type {qtype}")
    return _once(("mm", qtype), lambda: _DRIVERS[qtype][0], _MM_SIG, qtype not in _FLOAT_TYPES)


def _dequantizer(qtype: str, serial: bool = False):
    """The parallel dequantizer of qtype, or (``serial``) a copy that runs on the calling
    thread, one per BLAS worker."""
    deq = _DRIVERS[qtype][1]
    make = (lambda: numba.njit(**_base.OPTS)(deq.py_func)) if serial else (lambda: deq)
    return _once(("deq1" if serial else "deq", qtype), make, _DEQ_SIG, False)


def _serial_float(qtype: str):
    return _once(("mm1", qtype), lambda: numba.njit(**_base.OPTS)(_DRIVERS[qtype][0].py_func),
                 _MM_SIG, False)


_BLOCKS: dict = {}   # qtype -> (elements, bytes) per block: looked up on every kernel call


def _check(qtype, data, cols):
    shape = _BLOCKS.get(qtype)
    if shape is None:
        shape = _BLOCKS[qtype] = (quant.block_size(qtype), quant.type_size(qtype))
    block, size = shape
    if cols % block or data.shape[1] != cols // block * size:
        raise ValueError(f"{qtype}: {cols} columns do not match row bytes {data.shape[1]}")


# ------------------------------------------------------------------ prepared block scales
class Prepared:
    """A weight's f16 block scales as float32: ``d`` (rows, blocks), and Q4_1's mins ``m``
    (empty for the other types)."""

    __slots__ = ("d", "m")

    def __init__(self, d: np.ndarray, m: np.ndarray):
        self.d, self.m = d, m


_NO_SCALES = np.zeros((0, 0), np.float32)


def prepare(w):
    """Attach float32 copies of a Q4_0/Q4_1/Q8_0 QTensor's block scales (``w.prepared``) for
    the kernels outside AVX2; returns ``w``. Other qtypes are returned untouched."""
    _prepared(w)
    return w


def _prepared(w) -> Prepared | None:
    p = w.prepared
    if p is not None or w.qtype not in _SCALE_FIELDS or not w.data.flags.c_contiguous:
        return p
    data, size = w.data, quant.type_size(w.qtype)
    _check(w.qtype, data, w.shape[-1])
    arrays = [_NO_SCALES, _NO_SCALES]   # (d, m); MXFP4 keeps none
    for i, off in enumerate(_SCALE_FIELDS[w.qtype]):
        fill = _once(("scales", "any"), lambda: _quant.block_scales,
                     (_W, types.int64, types.int64, _O))
        arrays[i] = np.empty((data.shape[0], data.shape[1] // size), np.float32)
        fill(data, size, off, arrays[i])
    p = Prepared(*arrays)
    object.__setattr__(w, "prepared", p)   # derived data: the weight itself stays immutable
    return p


def prepared_nbytes(qtype: str, rows: int, cols: int) -> int:
    """Bytes of side arrays the kernels attach to a (rows, cols) weight of ``qtype``: the
    prepared scales of the 8-bit drivers off AVX2 (``_Scaled``), where those serve it; no
    other kernel prepares."""
    if not isinstance(_REGISTRY.get(("llama", qtype)), _Scaled):
        return 0
    return rows * (cols // 32) * 4 * len(_SCALE_FIELDS.get(qtype, ()))


# ---------------------------------------------------------------------- the decode registry
class _Portable:
    """The portable Numba drivers: 8-bit activations and integer block dots (float weights:
    float math), every row."""

    fused = False
    rows = False
    max_rows = 0   # batches go to matmul_raw (its own drivers below BLAS_MIN_ROWS)

    def __init__(self, qtype: str):
        self.qtype = qtype

    def mv(self, w, x2, out2):
        fn = _driver(w.qtype)
        if w.qtype in _FLOAT_TYPES and w.data.nbytes <= SERIAL_MAX_BYTES:
            fn = _serial_float(w.qtype)
        _check(w.qtype, w.data, w.shape[-1])
        fn(w.data, x2, out2)


class _Blocks32:
    """The Numba drivers of ``_quant`` for Q4_0/Q4_1/Q8_0 (and MXFP4), one specialization
    per qtype: ``_Scaled`` and ``_Float``."""

    fused = False
    max_rows = PREPARED_MAX_ROWS

    def __init__(self, qtype: str):
        self.qtype = qtype

    def _fn(self, prefix: str, sig):
        return _once((prefix, self.qtype),
                     lambda: getattr(_quant, prefix + self.qtype.lower()), sig)


class _Scaled(_Blocks32):
    """8-bit activations through prepared f32 block scales ("llama" off AVX2)."""

    rows = False

    def mv(self, w, x2, out2):
        p = _prepared(w)
        if p is None:   # a non-contiguous view: the raw driver reads the scales in place
            return _Portable(w.qtype).mv(w, x2, out2)
        self.compile()(w.data, p.d, p.m, x2, out2)

    def compile(self):
        return self._fn("mv_", _MV_SIG)


class _Float(_Blocks32):
    """Float activations ("exact"): every row or selected rows, scales read from the
    blocks."""

    rows = True

    def mv(self, w, x2, out2):
        _check(w.qtype, w.data, w.shape[-1])
        self._fn("mvf_", _MVF_SIG)(w.data, x2, out2)

    def mv_rows(self, w, x2, idx, out):
        _check(w.qtype, w.data, w.shape[-1])
        self._fn("mvf_rows_", _MVF_ROWS_SIG)(w.data, x2, idx, out)


class _Avx2:
    """The LLVM IR kernels of ``_simd``: rows selectable, weights sharing an input in one call,
    a whole gated expert in one call."""

    fused = True
    rows = True

    def __init__(self, qtype: str, numerics: str):
        self.qtype, self.kind = qtype, _simd.KIND[qtype]
        # batches below this take these kernels; "exact" prompts from BLAS_MIN_ROWS rows take
        # float activations through BLAS, as the portable drivers' types do
        self.max_rows = PREPARED_MAX_ROWS if numerics == "llama" else BLAS_MIN_ROWS

    def mv(self, w, x2, out2):
        _simd_mv((w,), x2, out2)

    def mv_rows(self, w, x2, idx, out):
        _check(w.qtype, w.data, w.shape[-1])
        fn = _once(("simd", "rows"), lambda: _simd.mv_rows, (types.int64, _W, _X, _IDX, _O1),
                   _AVX2_CODEGEN)
        fn(self.kind, w.data, x2, idx, out)


def _entry(numerics: str, qtype: str):
    # "exact" keeps 8-bit activations for the types without a float-activation kernel: those
    # take the same AVX2 kernels as "llama" (nothing more to compile for short prompts)
    if _simd.AVAILABLE and qtype in _simd.KIND and (numerics == "llama" or
                                                    qtype not in _SCALE_FIELDS):
        return _Avx2(qtype, numerics)
    if qtype in _SCALE_FIELDS:
        return _Float(qtype) if numerics == "exact" else _Scaled(qtype)
    return _Portable(qtype)


_REGISTRY = {(n, q): _entry(n, q) for n in NUMERICS for q in QTYPES}


def kernel(qtype: str, numerics: str = "llama"):
    """The decode kernel registered for (numerics, qtype)."""
    k = _REGISTRY.get((numerics, qtype))
    if k is None:
        if numerics not in NUMERICS:
            raise ValueError(f"numerics {numerics!r}: expected 'llama' or 'exact'")
        raise NotImplementedError(f"no kernel for weight type {qtype}")
    return k


# The AVX2 kernels are written in IR and run with Numba's default vectorizer settings (the
# numbers and speed they were measured with).
_AVX2_CODEGEN = False


# ``_simd.mv`` takes this many weights at once: one compiled specialization serves q/k/v and
# gate/up alike (a tuple of each length would be one each, about 2 s of compiling apiece);
# fewer weights are padded with weights of no rows.
_FUSED = 3
_FUSED_SIG = (types.int64, _W, _W, _W, _X, _O)


_NO_ROWS = np.zeros((0, 1), np.uint8)   # a weight of no rows, for the unused slots


def _simd_mv(ws, x2, out2):
    """ws: up to ``_FUSED`` QTensors of one AVX2 qtype and x2's column count -> out2 (n, sum
    rows)."""
    for w in ws:
        _check(w.qtype, w.data, w.shape[-1])
    fn = _once(("simd", "mv"), lambda: _simd.mv, _FUSED_SIG, _AVX2_CODEGEN)
    n = len(ws)
    fn(_simd.KIND[ws[0].qtype], ws[0].data, ws[1].data if n > 1 else _NO_ROWS,
       ws[2].data if n > 2 else _NO_ROWS, x2, out2)


# ------------------------------------------------------------------------------ the calls
_blas = []


def _blas_on_one_thread():
    """numpy's BLAS runs on one thread, set on the first BLAS call rather than at import:
    its worker threads spin between calls and starve the kernels' threads (measured on 2
    cores: an expert's dequantize + BLAS matmul 25x slower, prefill of SmolLM2 102 -> 133
    tok/s once BLAS stops competing)."""
    if not _blas:
        from threadpoolctl import threadpool_limits
        _blas.append(threadpool_limits(1, user_api="blas"))


_Q8_0_ACTS = ("Q4_0", "Q5_0", "Q8_0", "MXFP4")
_Q8_1_ACTS = ("Q4_1", "Q5_1")   # Q8_1: Q8_0's values, plus f16(d * sum) per block


def _q8_0_values(x):
    """x (n, cols) as ggml's quantize_row_q8_0 leaves it: per 32 values id = 127/amax, round
    half to even, scale stored as f16. Returns (rounded x, the integer values, the scales
    before and after their f16 rounding)."""
    xb = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(xb).max(axis=2)
    with np.errstate(divide="ignore"):
        iv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(xb * iv[:, :, None])
    d = (amax / np.float32(127)).astype(np.float32)
    d16 = d.astype(np.float16).astype(np.float32)
    return (q * d16[:, :, None]).reshape(x.shape), q, d, d16


def _q8_k_values(x):
    """x (n, cols) as ggml's quantize_row_q8_K leaves it: per 256 values the scale comes from
    the signed value of largest magnitude, q = min(127, rint(-127/max * x)), d = 1/iscale."""
    xb = x.reshape(x.shape[0], -1, 256)
    mx = np.take_along_axis(xb, np.abs(xb).argmax(axis=2)[:, :, None], axis=2)[:, :, 0]
    with np.errstate(divide="ignore"):
        iscale = np.where(mx != 0, np.float32(-127) / mx, np.float32(0)).astype(np.float32)
        d = np.where(mx != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
    q = np.minimum(np.float32(127), np.rint(xb * iscale[:, :, None]))
    return (q * d[:, :, None]).reshape(x.shape)


def llama_activations(qtype: str, x: np.ndarray) -> np.ndarray:
    """x (n, cols) float32 rounded as llama.cpp's CPU matmul rounds activations for a weight of
    ``qtype``: to its vec_dot type (Q8_0 / Q8_1 values, Q8_K for K-quants, F16, BF16; F32 and
    other types: unchanged). A float product of these with the dequantized weights is then
    llama.cpp's integer block product, to float32 rounding (Q8_1's f16 block sums aside: see
    ``matmul_raw``)."""
    if qtype in _Q8_0_ACTS or qtype in _Q8_1_ACTS:
        return _q8_0_values(x)[0]
    if qtype.endswith("_K"):
        return _q8_k_values(x)
    if qtype == "F16":
        return x.astype(np.float16).astype(np.float32)
    if qtype == "BF16":
        u = x.view(np.uint32)
        return ((u + np.uint32(0x7FFF) + ((u >> 16) & 1)) & np.uint32(0xFFFF0000)).view(np.float32)
    return x


def _q8_1_sum_correction(qtype, data, x):
    """Q4_1/Q5_1 meet Q8_1 activations, whose block sums llama.cpp stores as f16(d * sum q)
    and multiplies by the weight block's min: the float product of rounded activations and
    dequantized weights uses d * sum q instead. Returns the difference (n, rows)."""
    _, q, d, d16 = _q8_0_values(x)
    s = q.sum(axis=2)
    err = ((d * s).astype(np.float16).astype(np.float32) - d16 * s).astype(np.float32)
    size = quant.type_size(qtype)
    mins = data.reshape(data.shape[0], -1, size)[:, :, 2:4].copy().view(np.float16)[:, :, 0]
    return err @ mins.astype(np.float32).T


def matmul_raw(qtype: str, data: np.ndarray, cols: int, x: np.ndarray, out: np.ndarray | None = None,
               method: str = "auto", round_x: bool = False) -> np.ndarray:
    """x (n, cols) f32 times the weight rows in ``data`` (rows, row_bytes) uint8 -> (n, rows).

    ``data`` may be any C-contiguous row range of a tensor (e.g. one expert of a 3-D tensor).
    ``method``: "quant" (quantized activations, integer block dots, as llama.cpp), "blas"
    (dequantized f32 weight tiles @ numpy BLAS) or "auto" (blas for n >= BLAS_MIN_ROWS).
    With ``round_x`` BLAS takes the activations rounded as llama.cpp's matmul rounds them
    (``llama_activations``), so a prompt gets llama.cpp's numbers at BLAS speed.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, rows = x.shape[0], data.shape[0]
    if out is None:
        out = np.empty((n, rows), np.float32)
    _check(qtype, data, cols)
    if method == "blas" or (method == "auto" and n >= BLAS_MIN_ROWS):
        _blas_on_one_thread()
        xa = llama_activations(qtype, x) if round_x else x
        deq = _dequantizer(qtype, serial=True)
        # at least a tile per core the process may use, sized by that, not by the threads set
        tile = max(16, min(-(-rows // numba.config.NUMBA_NUM_THREADS), _TILE_BYTES // (4 * cols)))
        n_tiles = -(-rows // tile)
        n_parts = max(1, min(get_threads(), rows // 64, n_tiles))

        def part(i):
            # each worker thread dequantizes and multiplies its own contiguous run of tiles;
            # tiles are the same whatever the thread count, because BLAS may round a product
            # differently by its shape (OpenBLAS's small-matrix kernels)
            buf = np.empty((min(tile, rows), cols), np.float32)  # dequantized weight rows
            for j in range(n_tiles * i // n_parts, n_tiles * (i + 1) // n_parts):
                r0, r1 = j * tile, min(rows, (j + 1) * tile)
                wt = buf[: r1 - r0]
                deq(data, r0, r1, wt)
                np.matmul(xa, wt.T, out=out[:, r0:r1])
        parallel_for(n_parts, part)
        if round_x and qtype in _Q8_1_ACTS:
            out += _q8_1_sum_correction(qtype, data, x)
        return out
    _driver(qtype)(data, x, out)
    return out


def matvec_raw(qtype: str, data: np.ndarray, cols: int, x: np.ndarray,
               out: np.ndarray | None = None) -> np.ndarray:
    """x (cols,) f32 times the weight rows in ``data`` (rows, row_bytes) uint8 -> (rows,) f32,
    on the portable drivers (any row range; nothing prepared)."""
    return matvec(QTensor(qtype, (data.shape[0], cols), data), x, out, _portable=True)


def _vector(w, x, out, new=np.empty):
    """x as one contiguous float32 row for w, and ``out`` (made by ``new`` when None)."""
    x = np.asarray(x)
    if x.shape != (w.shape[-1],):
        raise ValueError(f"x has {x.shape[0] if x.ndim == 1 else x.shape} elements, weight "
                         f"has {w.shape[-1]} columns")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if out is None:
        out = new(w.data.shape[0], np.float32)
    return x.reshape(1, -1), out


def matvec(w, x: np.ndarray, out: np.ndarray | None = None, numerics: str = "llama", *,
           _portable: bool = False) -> np.ndarray:
    """``w`` (QTensor, shape (..., cols)) times x (cols,) f32 -> (rows,) f32, by the kernel
    registered for (numerics, w.qtype)."""
    k = _Portable(w.qtype) if _portable else kernel(w.qtype, numerics)
    x2, out = _vector(w, x, out)
    k.mv(w, x2, out.reshape(1, -1))
    return out


def matvec_rows(w, x: np.ndarray, rows: np.ndarray, out: np.ndarray | None = None,
                numerics: str = "llama") -> np.ndarray:
    """``matvec`` for the given rows only: out[rows] as ``matvec`` computes them (bit for bit
    on the AVX2 kernels; to float32 rounding under "exact" numerics, where LLVM may order
    the block sums differently in the two drivers); other entries are left as they were
    (zero in a new ``out``). Kernels without row selection compute all rows."""
    k = kernel(w.qtype, numerics)
    if not k.rows:
        return matvec(w, x, out, numerics)
    x2, out = _vector(w, x, out, np.zeros)   # rows not selected read as zero
    k.mv_rows(w, x2, np.ascontiguousarray(rows, np.int64), out)
    return out


def matmul(w, x: np.ndarray, out: np.ndarray | None = None, method: str = "auto",
           numerics: str = "llama", round_x: bool = False) -> np.ndarray:
    """``w`` (QTensor) times each row of x (n, cols) f32 -> (n, rows) f32. See ``matmul_raw``.

    With method "auto", batches below the kernel's ``max_rows`` (``PREPARED_MAX_ROWS``;
    ``BLAS_MIN_ROWS`` for 8-bit activations under "exact") take the decode kernel of
    (numerics, qtype) where it is not the portable one; BLAS serves larger batches.
    """
    k = kernel(w.qtype, numerics)
    if method == "auto" and x.shape[0] < k.max_rows:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != w.shape[-1]:
            raise ValueError(f"x has shape {x.shape}, weight has {w.shape[-1]} columns")
        if out is None:
            out = np.empty((x.shape[0], w.data.shape[0]), np.float32)
        k.mv(w, x, out)
        return out
    return matmul_raw(w.qtype, w.data, w.shape[-1], x, out, method, round_x)


def _fused_outputs(ws, x) -> list[np.ndarray]:
    """Up to ``_FUSED`` weights of one AVX2 type times x (n, cols) in one ``_simd_mv`` call:
    each weight's (n, rows) output."""
    sizes = [w.data.shape[0] for w in ws]
    out = np.empty((x.shape[0], sum(sizes)), np.float32)
    _simd_mv(ws, x, out)
    parts, start = [], 0
    for size in sizes:
        part = out[:, start:start + size]   # one row: already contiguous
        parts.append(part if x.shape[0] == 1 else np.ascontiguousarray(part))
        start += size
    return parts


def matmul_many(ws, x: np.ndarray, numerics: str = "llama",
                round_x: bool = False) -> list[np.ndarray]:
    """``[matmul(w, x) for w in ws]``, for weights that share the input x (n, cols). Small
    batches of weights on the AVX2 kernels go through one call per weight type: the
    activations are quantized once and all rows share one parallel loop (q/k/v, gate/up)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] >= PREPARED_MAX_ROWS:
        return [matmul(w, x, numerics=numerics, round_x=round_x) for w in ws]
    q = ws[0].qtype
    k = kernel(q, numerics)
    if k.fused and x.shape[0] < k.max_rows and len(ws) <= _FUSED and \
            all(w.qtype == q and w.shape[-1] == x.shape[1] for w in ws):
        return _fused_outputs(ws, x)   # decode's usual case (q/k/v, gate/up): no grouping
    groups: dict = {}
    for i, w in enumerate(ws):
        k = kernel(w.qtype, numerics)
        if k.fused and x.shape[0] < k.max_rows and w.shape[-1] == x.shape[1]:
            groups.setdefault(w.qtype, []).append(i)
    res: list = [None] * len(ws)
    calls = [idx[j:j + _FUSED] for idx in groups.values() for j in range(0, len(idx), _FUSED)]
    for idx in calls:
        for i, part in zip(idx, _fused_outputs([ws[i] for i in idx], x)):
            res[i] = part
    return [r if r is not None else matmul(w, x, numerics=numerics, round_x=round_x)
            for r, w in zip(res, ws)]


_ADDR = types.Array(types.int64, 2, "C", readonly=True)
_O2 = types.Array(types.float32, 2, "C")


def experts_decode(experts: list, x: np.ndarray, act: str, numerics: str = "llama"):
    """One token through k gated experts (``moe.Expert``), down_e · (act(gate_e · x) *
    (up_e · x)) for each, in one kernel call; x (n_embd,). Returns (out (k, n_embd), up rows
    computed) — for "relu" (ReGLU) only the rows with a positive gate — or None when the
    weights' kernel has no fused expert (the caller then takes the separate calls, whose
    results these equal bit for bit). The experts' buffers must stay alive during the call
    (the kernel reads them by address)."""
    first = experts[0]
    q = first.gate.qtype
    if act not in ("relu", "silu") or not kernel(q, numerics).fused:
        return None
    n_ff, n_embd = first.gate.shape[-2], first.gate.shape[-1]
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(1, -1)
    if x.shape[1] != n_embd:
        raise ValueError(f"experts of {n_embd} columns do not fit x of {x.shape[1]}")
    addr = np.empty((len(experts), 3), np.int64)
    for i, ex in enumerate(experts):
        a = _addresses(ex, q, n_ff, n_embd)
        if a is None:
            return None
        addr[i] = a
    fn = _once(("simd", "experts"), lambda: _simd.experts,
               (types.int64, _ADDR, types.int64, types.int64, types.int64, _X, types.boolean,
                _O2), _AVX2_CODEGEN)
    out = np.empty((len(experts), n_embd), np.float32)
    n = fn(_simd.KIND[q], addr, n_ff, first.gate.data.shape[1], first.down.data.shape[1], x,
           act == "relu", out)
    return out, int(n)


def _addresses(ex, q: str, n_ff: int, n_embd: int):
    """The byte addresses of an expert's gate, up and down, checked once and kept on it; None
    when the expert does not fit the fused kernel (another type, a transposed down)."""
    if ex.addr is None:
        ws = (ex.gate, ex.up, ex.down)
        if ex.down_t or any(w.qtype != q for w in ws) or ex.gate.shape[-2:] != (n_ff, n_embd) \
                or ex.up.shape[-2:] != (n_ff, n_embd) or ex.down.shape[-2:] != (n_embd, n_ff):
            return None
        for w in ws:
            _check(q, w.data, w.shape[-1])
            if not w.data.flags.c_contiguous:
                return None
        ex.addr = tuple(w.data.__array_interface__["data"][0] for w in ws)
    return ex.addr


def dequantize_raw(qtype: str, data: np.ndarray, cols: int) -> np.ndarray:
    """Raw blocks (rows, row_bytes) -> float32 (rows, cols)."""
    _check(qtype, data, cols)
    out = np.empty((data.shape[0], cols), np.float32)
    _dequantizer(qtype)(data, 0, data.shape[0], out)
    return out


# ----------------------------------------------------------------------------- small ops
def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray | None = None) -> np.ndarray:
    """RMS-normalize each row of x (..., d) f32 and multiply by weight (d,)."""
    _expect_f32("rms_norm", x, weight)
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm weight has shape {weight.shape}, expected ({x.shape[-1]},)")
    x2 = x.reshape(-1, x.shape[-1])
    if out is None:
        out = np.empty_like(x)
    _ops.rms_norm_rows(x2, weight, np.float32(eps), out.reshape(x2.shape))
    return out


_NO_FACTORS = np.zeros(0, np.float32)


def _expect_f32(what: str, *arrays: np.ndarray, contiguous: bool = False) -> None:
    """The compiled kernels are typed for float32 arrays (and index some as flat buffers)."""
    for a in arrays:
        if not isinstance(a, np.ndarray) or a.dtype != np.float32 or \
                (contiguous and not a.flags.c_contiguous):
            raise ValueError(f"{what}: expected {'C-contiguous ' if contiguous else ''}float32 "
                             f"arrays, got {getattr(a, 'dtype', type(a).__name__)}")


class YaRN(NamedTuple):
    """ggml's YaRN parameters for ``rope``: the extrapolation mix, the pair range its ramp
    spans and the cos/sin scale (see ``yarn``)."""

    ext_factor: float
    corr_low: float
    corr_high: float
    attn_factor: float


def yarn(n_dims: int, base: float, freq_scale: float, n_ctx_orig: int, beta_fast: float = 32.0,
         beta_slow: float = 1.0, rope_attn_factor: float = 1.0) -> YaRN:
    """YaRN as llama.cpp sets it up for ``rope.scaling.type`` yarn: ext_factor 1, the ramp's
    pairs from ggml_rope_yarn_corr_dims, and the attention factor llama_context computes
    (its magnitude correction cancelled against the one the kernel applies, times the
    file's ``rope.scaling.attn_factor``), all in float32 as there."""
    F = np.float32

    def corr_dim(n_rot):
        return F(n_dims) * F(np.log(F(n_ctx_orig) / (F(n_rot) * F(2) * F(np.pi)))) / \
            (F(2) * F(np.log(F(base))))
    low = max(0.0, float(np.floor(corr_dim(beta_fast))))
    high = min(float(n_dims - 1), float(np.ceil(corr_dim(beta_slow))))
    factor = F(1) / F(freq_scale)
    attn = F(1) if factor <= 1 else F(F(0.1) * F(np.log(factor)) + F(1))
    attn = F(attn * (F(1) / (F(1) + F(0.1) * F(np.log(factor)))))
    return YaRN(1.0, low, high, float(F(attn * F(rope_attn_factor))))


_NO_YARN = YaRN(0.0, 0.0, 0.0, 1.0)


def rope(x: np.ndarray, positions: np.ndarray, n_dims: int, base: float, mode: str = "neox",
         freq_scale: float = 1.0, out: np.ndarray | None = None,
         freq_factors: np.ndarray | None = None, yarn: YaRN | None = None) -> np.ndarray:
    """Rotary embedding of x (n_tokens, n_heads, head_dim) f32, in place unless ``out`` given.

    mode "neox" rotates pairs (i, i + n_dims/2), "norm" adjacent pairs (2i, 2i+1); dims from
    n_dims on pass through. theta_i = freq_scale * pos * base**(-2i/n_dims) / freq_factors[i]
    (ggml's ``rope_ext`` frequency factors, e.g. LongRoPE; none: all 1); ``yarn`` (see
    ``yarn()``) mixes in the unscaled angle over a ramp of pairs and scales cos and sin.
    """
    if mode not in ("neox", "norm"):
        raise ValueError(f"rope mode {mode!r}: expected 'neox' or 'norm'")
    _expect_f32("rope", x, *(() if out is None else (out,)), contiguous=True)
    # the kernel rotates pairs within the first n_dims of each head, one position per token
    if x.ndim != 3 or n_dims % 2 or not 0 < n_dims <= x.shape[-1]:
        raise ValueError(f"rope: n_dims {n_dims} must be even and within the head size of x "
                         f"{x.shape}")
    positions = np.ascontiguousarray(positions, np.int64)
    if positions.shape != (x.shape[0],):
        raise ValueError(f"rope: {positions.shape} positions for {x.shape[0]} tokens")
    if out is not None and out.shape != x.shape:
        raise ValueError(f"rope: out has shape {out.shape}, expected {x.shape}")
    if freq_factors is None:
        ff = _NO_FACTORS
    else:
        ff = np.ascontiguousarray(freq_factors, np.float32)
        if ff.shape != (n_dims // 2,):
            raise ValueError(f"rope frequency factors have shape {ff.shape}, expected "
                             f"({n_dims // 2},)")
    if out is None:
        out = x
    y = yarn or _NO_YARN
    _ops.rope_rows(x, positions, n_dims, float(base), float(freq_scale), mode == "neox", ff,
                   float(y.ext_factor), float(y.corr_low), float(y.corr_high),
                   float(y.attn_factor), out)
    return out


def softmax(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Softmax over the last axis of x (..., d) f32."""
    _expect_f32("softmax", x)
    x2 = x.reshape(-1, x.shape[-1])
    if out is None:
        out = np.empty_like(x)
    _ops.softmax_rows(x2, out.reshape(x2.shape))
    return out


def _glu(fn, gate, up, out):
    _expect_f32("gated activation", gate, up, *(() if out is None else (out,)))
    if up.shape != gate.shape or (out is not None and out.shape != gate.shape):
        raise ValueError(f"gated activation: gate {gate.shape}, up {up.shape} and out "
                         f"{None if out is None else out.shape} differ")
    if out is None:
        out = np.empty_like(gate)
    fn(gate.reshape(-1), up.reshape(-1), out.reshape(-1))
    return out


def silu_mul(gate: np.ndarray, up: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """silu(gate) * up, element-wise, f32."""
    return _glu(_ops.silu_mul_flat, gate, up, out)


def gelu_tanh_mul(gate: np.ndarray, up: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """gelu(gate) * up with ggml's tanh approximation (computed in f32, no f16 table)."""
    return _glu(_ops.gelu_tanh_mul_flat, gate, up, out)


def swiglu_oai_mul(gate: np.ndarray, up: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """gpt-oss's SwiGLU: g * sigmoid(1.702 g) * (u + 1) with g = min(gate, 7) and u = up
    clamped to [-7, 7], f32."""
    return _glu(_ops.swiglu_oai_mul_flat, gate, up, out)


def relu_mul(gate: np.ndarray, up: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """relu(gate) * up, element-wise, f32."""
    return _glu(_ops.relu_mul_flat, gate, up, out)


# ------------------------------------------------------------------------------ control
def set_threads(n: int) -> None:
    """Worker threads for kernels launched from the calling thread (Numba's setting is per thread)."""
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


def get_threads() -> int:
    return numba.get_num_threads()


def warmup(qtypes=QTYPES) -> float:
    """Compile (or load from Numba's disk cache) every kernel; returns the seconds it took."""
    t0 = time.perf_counter()
    for q in qtypes:
        _driver(q)
        _dequantizer(q)
        _dequantizer(q, serial=True)
        k = kernel(q)
        if isinstance(k, _Scaled):
            k.compile()
    f = np.zeros((1, 2, 4), np.float32)
    rms_norm(f[0], np.ones(4, np.float32), 1e-5)
    rope(f.copy(), np.zeros(1, np.int64), 4, 10000.0, "neox")
    softmax(f[0])
    for fn in (silu_mul, gelu_tanh_mul, relu_mul):
        fn(f, f)
    return time.perf_counter() - t0
