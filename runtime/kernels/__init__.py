"""Numba CPU kernels: quantized matvec/matmul with llama.cpp's numerics, and the small ops.

Weights stay in their raw ggml blocks (``QTensor.data``, uint8 (rows, row_bytes)). Decode
(``matvec``) quantizes the activation once per call to the weight type's vec_dot type (Q8_0,
Q8_1 or Q8_K), takes exact integer block dot products and accumulates blocks in f32, as
llama.cpp's x86 CPU path does. Prefill (``matmul``) by default dequantizes weight row tiles to
f32 and multiplies with numpy's BLAS (several times faster than the integer path at prefill
sizes; weights exact, activations unquantized, so slightly *more* precise than llama.cpp);
``matmul(..., method="quant")`` runs the integer path instead.

On x86 hosts with AVX2, decode of Q4_0/Q4_1/Q5_0/Q8_0/Q4_K/Q6_K runs on the LLVM IR kernels of
``_simd`` (same numerics, blocks summed in 8-lane registers; ``matmul_many`` serves several
weights sharing an input in one call, ``expert_decode`` a whole gated expert). Elsewhere, and
under "exact" numerics (``set_numerics``), Q4_0/Q4_1/Q8_0 decode reads its f16 block scales
from float32 side arrays made once per weight (``prepare(w)``; ``matvec(w, x)`` prepares on
first use, keyed by the ``w.data`` object, so a weight's data must not be modified in place
afterwards). Extra memory: 4 bytes per 32 weights (8 for Q4_1). ``matvec_raw`` on arbitrary
row ranges needs nothing prepared. Results are bit-identical either way.

Numba's on-disk cache follows ``NUMBA_CACHE_DIR``; without it, compiled kernels go to
``$POCKETLM_HOME/numba/<hash of the kernel sources>`` (a new folder whenever a kernel file
changes). ``warmup()`` compiles (or loads) every kernel and returns the seconds it took. ``set_threads(n)`` sets the worker count for kernels
called from the current thread.
"""
from __future__ import annotations

import contextlib
import hashlib
import time
import weakref
from pathlib import Path

import numba
import numpy as np
from numba import types

from threadpoolctl import threadpool_limits

from pocketlm.api import store

def _use_versioned_cache() -> None:
    """Point Numba's on-disk cache at a folder per version of these kernel sources.

    Numba checks a cached kernel against its own file only, so an edit to a helper it
    inlines from another file (``_base.py``) would keep serving stale machine code. Left
    alone when ``NUMBA_CACHE_DIR`` is set, or when the folder cannot be made.
    """
    if numba.config.CACHE_DIR:
        return
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    d = store.home() / "numba" / h.hexdigest()[:16]
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    numba.config.CACHE_DIR = str(d)


_use_versioned_cache()   # before the kernel modules below are decorated

from . import _base, _float, _ops, _quant, _simd  # noqa: E402
from ._pool import parallel_for  # noqa: E402
from ._base import block_codegen  # noqa: E402

# numpy's BLAS runs on one thread: its worker threads spin between calls and starve the
# kernels' threads (measured on 2 cores: an expert's dequantize + BLAS matmul 25x slower,
# prefill of SmolLM2 102 -> 133 tok/s once BLAS stops competing).
threadpool_limits(1, user_api="blas")

# qtype -> (driver, dequantizer, elements per block, bytes per block, uses block codegen)
_TABLE = {
    "F32": (_float.mm_f32, _float.deq_f32, 1, 4, False),
    "F16": (_float.mm_f16, _float.deq_f16, 1, 2, False),
    "BF16": (_float.mm_bf16, _float.deq_bf16, 1, 2, False),
    "Q4_0": (_quant.mm_q4_0, _quant.deq_q4_0, 32, 18, True),
    "Q4_1": (_quant.mm_q4_1, _quant.deq_q4_1, 32, 20, True),
    "Q5_0": (_quant.mm_q5_0, _quant.deq_q5_0, 32, 22, True),
    "Q5_1": (_quant.mm_q5_1, _quant.deq_q5_1, 32, 24, True),
    "Q8_0": (_quant.mm_q8_0, _quant.deq_q8_0, 32, 34, True),
    "Q2_K": (_quant.mm_q2_k, _quant.deq_q2_k, 256, 84, True),
    "Q3_K": (_quant.mm_q3_k, _quant.deq_q3_k, 256, 110, True),
    "Q4_K": (_quant.mm_q4_k, _quant.deq_q4_k, 256, 144, True),
    "Q5_K": (_quant.mm_q5_k, _quant.deq_q5_k, 256, 176, True),
    "Q6_K": (_quant.mm_q6_k, _quant.deq_q6_k, 256, 210, True),
    "Q8_K": (_quant.mm_q8_k, _quant.deq_q8_k, 256, 292, True),
}
QTYPES = tuple(_TABLE)

_W = types.Array(types.uint8, 2, "C", readonly=True)     # writable arrays convert to this
_X = types.Array(types.float32, 2, "C", readonly=True)
_O = types.Array(types.float32, 2, "C")
_MM_SIG = (_W, _X, _O)
_DEQ_SIG = (_W, types.int64, types.int64, _O)

_S = types.Array(types.float32, 2, "C", readonly=True)
_MV_SIG = (_W, _S, _S, _X, _O)

# Prepared decode: qtype -> (driver, block bytes, byte offsets of the f16 scale fields)
_PREP = {
    "Q4_0": (_quant.mv_q4_0, 18, (0,)),
    "Q4_1": (_quant.mv_q4_1, 20, (0, 2)),
    "Q8_0": (_quant.mv_q8_0, 34, (0,)),
}
_NO_SCALES = np.zeros((0, 0), np.float32)
# Float-activation drivers over the same prepared scales (numerics "exact").
_PREP_F = {"Q4_0": _quant.mvf_q4_0, "Q4_1": _quant.mvf_q4_1, "Q8_0": _quant.mvf_q8_0}
_mvf: dict = {}
_PREP_ROWS = {"Q4_0": _quant.mvf_rows_q4_0, "Q4_1": _quant.mvf_rows_q4_1,
              "Q8_0": _quant.mvf_rows_q8_0}
_mvr: dict = {}
# Small batches of prepared weights run the matvec drivers row by row up to this many rows;
# above it dequantize + BLAS amortizes its fixed cost (crossover measured at 16 rows on
# 576x576 .. 1536x1536 Q4_0 matrices, with BLAS single-threaded as below).
PREPARED_MAX_ROWS = 16
_numerics = ["llama"]
_simd_compiled: set = set()   # AVX2 driver signatures compiled so far

_mm: dict = {}    # qtype -> compiled driver
_mv: dict = {}    # qtype -> compiled prepared-decode driver
_scales: dict = {}   # id(w.data) -> (weakref to w.data, d, m); dropped when the data dies
_deq: dict = {}   # qtype -> compiled dequantizer (parallel)
_deq1: dict = {}  # qtype -> compiled dequantizer (serial: one per BLAS worker thread)

# Prefill: below this many activation rows the integer path wins over dequantize + BLAS.
BLAS_MIN_ROWS = 8
_TILE_BYTES = 1 << 21   # f32 weight tile size for the BLAS path: stays in L2/L3


def _compile(qtype: str):
    driver, deq, _, _, blocky = _TABLE[qtype]
    if blocky:
        with block_codegen():
            driver.compile(_MM_SIG)
    else:
        driver.compile(_MM_SIG)
    deq.compile(_DEQ_SIG)
    deq1 = numba.njit(**_base.OPTS)(deq.py_func)
    deq1.compile(_DEQ_SIG)
    # A stray signature compiled later would miss the codegen settings; refuse it instead.
    for fn in (driver, deq, deq1):
        fn.disable_compile()
    _mm[qtype], _deq[qtype], _deq1[qtype] = driver, deq, deq1
    return driver


def _driver(qtype: str):
    fn = _mm.get(qtype)
    if fn is None:
        if qtype not in _TABLE:
            raise NotImplementedError(f"no kernel for weight type {qtype}")
        fn = _compile(qtype)
    return fn


def _mv_driver(qtype: str):
    fn = _mv.get(qtype)
    if fn is None:
        with block_codegen():
            _PREP[qtype][0].compile(_MV_SIG)
            _quant.block_scales.compile((_W, types.int64, types.int64, _O))
            _quant.block_scales_serial.compile((_W, types.int64, types.int64, _O))
        _PREP[qtype][0].disable_compile()
        fn = _mv[qtype] = _PREP[qtype][0]
    return fn


def set_numerics(mode: str) -> None:
    """How quantized weights meet activations in ``matvec`` and small ``matmul`` calls.

    "llama" (default): activations are quantized to 8 bits per 32-block and block dots are
    exact integer sums, as llama.cpp's CPU backend does; on AVX2 hosts by the hand-written
    kernels of ``_simd`` (Q4_0/Q4_1/Q5_0/Q8_0/Q4_K/Q6_K; about 2x the portable kernels),
    elsewhere by the portable Numba ones.
    Results sit about 0.2-0.4 logits from exact math, as llama.cpp's do.
    "exact": activations stay float32 and weights are dequantized in registers, so results
    sit within float32 rounding of exact math, the same in decode and in batches below
    ``PREPARED_MAX_ROWS`` (larger batches multiply dequantized weights with BLAS), for
    Q4_0/Q4_1/Q8_0; other weight types keep the 8-bit path in matvec.
    """
    if mode not in ("exact", "llama"):
        raise ValueError(f"numerics {mode!r}: expected 'exact' or 'llama'")
    _numerics[0] = mode


def get_numerics() -> str:
    return _numerics[0]


@contextlib.contextmanager
def numerics(mode: str):
    """``with kernels.numerics("exact"): ...`` runs the block under ``mode`` (see
    ``set_numerics``) and restores the previous mode afterwards."""
    before = _numerics[0]
    set_numerics(mode)
    try:
        yield
    finally:
        _numerics[0] = before


def _simd_ready(qtype: str) -> bool:
    """True when qtype runs on the AVX2 kernels (llama numerics on an AVX2 host)."""
    return _simd.AVAILABLE and _numerics[0] == "llama" and qtype in _simd.KIND


_SIMD_MV = types.Array(types.float32, 2, "C")


def _simd_compiled_fn(key, fn, sig):
    """``fn`` compiled for ``sig`` once (under the block codegen settings), then reused."""
    if key not in _simd_compiled:
        with block_codegen():
            fn.compile(sig)
        _simd_compiled.add(key)
    return fn


def _simd_mv(ws, x2, out2):
    """ws: tuple of QTensors of one simd qtype and x2's column count -> out2 (n, sum rows)."""
    for w in ws:
        _check(w.qtype, w.data, w.shape[-1])
    fn = _simd_compiled_fn(len(ws), _simd.mv,
                           (types.int64, types.UniTuple(_W, len(ws)), _X, _SIMD_MV))
    fn(_simd.KIND[ws[0].qtype], tuple(w.data for w in ws), x2, out2)


def _simd_rows(w, x2, idx, out):
    _check(w.qtype, w.data, w.shape[-1])
    fn = _simd_compiled_fn("rows", _simd.mv_rows,
                           (types.int64, _W, _X, types.Array(types.int64, 1, "C", readonly=True),
                            types.Array(types.float32, 1, "C")))
    fn(_simd.KIND[w.qtype], w.data, x2, idx, out)


def _mvf_driver(qtype: str):
    fn = _mvf.get(qtype)
    if fn is None:
        with block_codegen():
            _PREP_F[qtype].compile(_MV_SIG)
        _PREP_F[qtype].disable_compile()
        fn = _mvf[qtype] = _PREP_F[qtype]
    return fn


def _prepared_call(w, x2, out2):
    """Run x2 (n, cols) through a prepared weight into out2 (n, rows); False if w has none."""
    sc = _prepared(w) if w.qtype in _PREP else None
    if sc is None:
        return False
    fn = _mvf_driver(w.qtype) if _numerics[0] == "exact" else _mv[w.qtype]
    fn(w.data, sc[0], sc[1], x2, out2)
    return True


def prepare(w):
    """Convert the block scales of a Q4_0/Q4_1/Q8_0 QTensor to float32 once, for ``matvec``.

    Returns ``w`` itself; the side arrays live in a module cache keyed by the ``w.data``
    object and are dropped with it. Other qtypes are returned untouched.
    """
    _prepared(w)
    return w


def _prepared(w):
    """(d, m) float32 scale arrays of w, made on first call; None for other qtypes."""
    data = w.data
    e = _scales.get(id(data))
    if e is not None and e[0]() is data:
        return e[1], e[2]
    if w.qtype not in _PREP or not data.flags.c_contiguous:
        return None
    _, size, offs = _PREP[w.qtype]
    _check(w.qtype, data, w.shape[-1])
    _mv_driver(w.qtype)
    sc = []
    for off in offs:
        a = np.empty((data.shape[0], data.shape[1] // size), np.float32)
        _quant.block_scales(data, size, off, a)
        sc.append(a)
    d, m = sc[0], (sc[1] if len(sc) > 1 else _NO_SCALES)
    key = id(data)
    _scales[key] = (weakref.ref(data, lambda _, k=key: _scales.pop(k, None)), d, m)
    return d, m


def refresh(w):
    """Re-derive the prepared scales of ``w`` after its blocks were rewritten in place (an
    expert cache slot refilled from disk). Runs serially, so I/O threads may call it while
    other kernels run; allocates the side arrays on first use. Other qtypes, and weights
    that run on the AVX2 kernels: nothing to derive."""
    if w.qtype not in _PREP:
        return w
    data = w.data
    if _simd_ready(w.qtype):
        # the AVX2 kernels read the f16 scales in place: drop stale side arrays (an
        # "exact" call later prepares them again) instead of spending I/O threads' CPU
        _scales.pop(id(data), None)
        return w
    _, size, offs = _PREP[w.qtype]
    e = _scales.get(id(data))
    if e is None or e[0]() is not data:
        _check(w.qtype, data, w.shape[-1])
        _mv_driver(w.qtype)
        arrays = [np.empty((data.shape[0], data.shape[1] // size), np.float32) for _ in offs]
        d, m = arrays[0], (arrays[1] if len(arrays) > 1 else _NO_SCALES)
        key = id(data)
        _scales[key] = (weakref.ref(data, lambda _, k=key: _scales.pop(k, None)), d, m)
        e = _scales[key]
    for off, a in zip(offs, (e[1], e[2])):
        _quant.block_scales_serial(data, size, off, a)
    return w


def prepared_nbytes(qtype: str, rows: int, cols: int) -> int:
    """Bytes of side arrays ``prepare`` adds to a (rows, cols) weight of ``qtype``."""
    if qtype not in _PREP:
        return 0
    return rows * (cols // 32) * 4 * len(_PREP[qtype][2])


def _check(qtype, data, cols):
    block, size = _TABLE[qtype][2], _TABLE[qtype][3]
    if cols % block or data.shape[1] != cols // block * size:
        raise ValueError(f"{qtype}: {cols} columns do not match row bytes {data.shape[1]}")


def matmul_raw(qtype: str, data: np.ndarray, cols: int, x: np.ndarray, out: np.ndarray | None = None,
               method: str = "auto") -> np.ndarray:
    """x (n, cols) f32 times the weight rows in ``data`` (rows, row_bytes) uint8 -> (n, rows).

    ``data`` may be any C-contiguous row range of a tensor (e.g. one expert of a 3-D tensor).
    ``method``: "quant" (quantized activations, integer block dots, as llama.cpp), "blas"
    (dequantized f32 weight tiles @ numpy BLAS) or "auto" (blas for n >= BLAS_MIN_ROWS).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, rows = x.shape[0], data.shape[0]
    if out is None:
        out = np.empty((n, rows), np.float32)
    if method == "blas" or (method == "auto" and n >= BLAS_MIN_ROWS):
        _check(qtype, data, cols)
        _driver(qtype)
        deq = _deq1[qtype]
        tile = max(16, min(rows, _TILE_BYTES // (4 * cols)))
        n_parts = max(1, min(get_threads(), rows // 64))

        def part(i):
            # each worker thread dequantizes and multiplies its own contiguous rows
            p0, p1 = rows * i // n_parts, rows * (i + 1) // n_parts
            buf = np.empty((min(tile, p1 - p0), cols), np.float32)  # dequantized weight rows
            for r0 in range(p0, p1, tile):
                r1 = min(p1, r0 + tile)
                wt = buf[: r1 - r0]
                deq(data, r0, r1, wt)
                np.matmul(x, wt.T, out=out[:, r0:r1])
        parallel_for(n_parts, part)
        return out
    _check(qtype, data, cols)
    _driver(qtype)(data, x, out)
    return out


def matvec_raw(qtype: str, data: np.ndarray, cols: int, x: np.ndarray,
               out: np.ndarray | None = None) -> np.ndarray:
    """x (cols,) f32 times the weight rows in ``data`` (rows, row_bytes) uint8 -> (rows,) f32."""
    fn = _mm.get(qtype) or _driver(qtype)
    if data.nbytes <= SERIAL_MAX_BYTES and qtype in _FLOAT_TYPES:
        fn = _serial_float(qtype)
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    if out is None:
        out = np.empty(data.shape[0], np.float32)
    _, _, block, size, _ = _TABLE[qtype]
    if x.shape[0] != cols or cols % block or data.shape[1] != cols // block * size:
        _check(qtype, data, cols)
        raise ValueError(f"x has {x.shape[0]} elements, weight has {cols} columns")
    fn(data, x.reshape(1, cols), out.reshape(1, -1))
    return out


# Float weights this small (MoE routers) are multiplied on the calling thread: a parallel
# region costs more than the work, and stalls whenever another thread (expert I/O) holds
# one of its cores (SmallThinker router: 0.77 ms a call under a 2 GiB budget, 30 us serial).
SERIAL_MAX_BYTES = 1 << 18
_FLOAT_TYPES = ("F32", "F16", "BF16")
_mm1: dict = {}


def _serial_float(qtype: str):
    fn = _mm1.get(qtype)
    if fn is None:
        fn = numba.njit(**_base.OPTS)(_TABLE[qtype][0].py_func)
        fn.compile(_MM_SIG)
        fn.disable_compile()
        _mm1[qtype] = fn
    return fn


def matvec(w, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``w`` (QTensor, shape (..., cols)) times x (cols,) f32 -> (rows,) f32.

    Q4_0/Q4_1/Q8_0 weights are prepared (see ``prepare``) on first use under "exact" numerics.
    """
    if _simd_ready(w.qtype):
        if out is None:
            out = np.empty(w.data.shape[0], np.float32)
        matmul(w, np.asarray(x).reshape(1, -1), out.reshape(1, -1))
        return out
    if w.qtype not in _PREP:
        return matvec_raw(w.qtype, w.data, w.shape[-1], x, out)
    data, cols = w.data, w.shape[-1]
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    if out is None:
        out = np.empty(data.shape[0], np.float32)
    if x.shape[0] != cols:
        raise ValueError(f"x has {x.shape[0]} elements, weight has {cols} columns")
    if not _prepared_call(w, x.reshape(1, cols), out.reshape(1, -1)):
        return matvec_raw(w.qtype, data, cols, x, out)
    return out


def matvec_rows(w, x: np.ndarray, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``matvec`` for the given rows only: out[rows] as ``matvec`` computes them (bit for bit
    on the AVX2 kernels; to float32 rounding under "exact" numerics, where LLVM may order
    the block sums differently in the two drivers); other entries are left as they were
    (zero in a new ``out``). Weights without a row-selecting kernel (the portable "llama"
    path) compute all rows."""
    if out is None:
        out = np.zeros(w.data.shape[0], np.float32)
    if _simd_ready(w.qtype):
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape != (w.shape[-1],):
            raise ValueError(f"x has shape {x.shape}, weight has {w.shape[-1]} columns")
        _simd_rows(w, x.reshape(1, -1), np.ascontiguousarray(rows, np.int64), out)
        return out
    if w.qtype not in _PREP_ROWS or _numerics[0] != "exact":
        return matvec(w, x, out)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape != (w.shape[-1],):
        raise ValueError(f"x has shape {x.shape}, weight has {w.shape[-1]} columns")
    sc = _prepared(w)
    fn = _mvr.get(w.qtype)
    if fn is None:
        with block_codegen():
            _PREP_ROWS[w.qtype].compile(_MV_SIG[:4] + (types.Array(types.int64, 1, "C",
                                                                  readonly=True),
                                                      types.Array(types.float32, 1, "C")))
        _PREP_ROWS[w.qtype].disable_compile()
        fn = _mvr[w.qtype] = _PREP_ROWS[w.qtype]
    fn(w.data, sc[0], sc[1], x.reshape(1, -1), np.ascontiguousarray(rows, np.int64), out)
    return out


def matmul(w, x: np.ndarray, out: np.ndarray | None = None, method: str = "auto") -> np.ndarray:
    """``w`` (QTensor) times each row of x (n, cols) f32 -> (n, rows) f32. See ``matmul_raw``.

    With method "auto", weights with a decode kernel (the AVX2 ones, or the prepared
    Q4_0/Q4_1/Q8_0 path) take it for batches below ``PREPARED_MAX_ROWS`` rows (numerics per
    ``set_numerics``), BLAS above.
    """
    if method == "auto" and x.shape[0] < PREPARED_MAX_ROWS and (
            w.qtype in _PREP or _simd_ready(w.qtype)):
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != w.shape[-1]:
            raise ValueError(f"x has shape {x.shape}, weight has {w.shape[-1]} columns")
        if out is None:
            out = np.empty((x.shape[0], w.data.shape[0]), np.float32)
        if _simd_ready(w.qtype):
            _simd_mv((w,), x, out)
            return out
        if _prepared_call(w, x, out):
            return out
    return matmul_raw(w.qtype, w.data, w.shape[-1], x, out, method)


def expert_decode(gate, up, down, x: np.ndarray, act: str):
    """One token through one gated expert, down · (act(gate · x) * (up · x)), in one kernel
    call; x (n_embd,). Returns (out (n_embd,), rows computed in up) — for "relu" (ReGLU)
    only the rows with a positive gate — or None when the weights do not run on the AVX2
    kernels (the caller then takes the separate calls, whose results these equal bit for
    bit)."""
    q = gate.qtype
    if act not in ("relu", "silu") or not _simd_ready(q) or up.qtype != q or down.qtype != q:
        return None
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(1, -1)
    n_ff, n_embd = gate.shape[-2], gate.shape[-1]
    if x.shape[1] != n_embd or up.shape[-2:] != (n_ff, n_embd) or \
            down.shape[-2:] != (n_embd, n_ff):
        raise ValueError(f"expert shapes {gate.shape} {up.shape} {down.shape} do not fit "
                         f"x of {x.shape[1]}")
    for w in (gate, up, down):
        _check(q, w.data, w.shape[-1])
    fn = _simd_compiled_fn("expert", _simd.expert, (types.int64, _W, _W, _W, _X, types.boolean,
                                                    types.Array(types.float32, 1, "C")))
    out = np.empty(n_embd, np.float32)
    n = fn(_simd.KIND[q], gate.data, up.data, down.data, x, act == "relu", out)
    return out, int(n)


def matmul_many(ws, x: np.ndarray) -> list[np.ndarray]:
    """``[matmul(w, x) for w in ws]``, for weights that share the input x (n, cols). Small
    batches of weights that run on the AVX2 kernels go through one call per weight type:
    the activations are quantized once and all rows share one parallel loop (q/k/v, gate/up)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] >= PREPARED_MAX_ROWS:
        return [matmul(w, x) for w in ws]
    groups: dict = {}
    for i, w in enumerate(ws):
        if _simd_ready(w.qtype) and w.shape[-1] == x.shape[1]:
            groups.setdefault(w.qtype, []).append(i)
    res: list = [None] * len(ws)
    for idx in groups.values():
        sizes = [ws[i].data.shape[0] for i in idx]
        out = np.empty((x.shape[0], sum(sizes)), np.float32)
        _simd_mv(tuple(ws[i] for i in idx), x, out)
        start = 0
        for i, size in zip(idx, sizes):
            part = out[:, start:start + size]   # one row: already contiguous
            res[i] = part if x.shape[0] == 1 else np.ascontiguousarray(part)
            start += size
    return [r if r is not None else matmul(w, x) for r, w in zip(res, ws)]


def dequantize_raw(qtype: str, data: np.ndarray, cols: int) -> np.ndarray:
    """Raw blocks (rows, row_bytes) -> float32 (rows, cols)."""
    _check(qtype, data, cols)
    _driver(qtype)
    out = np.empty((data.shape[0], cols), np.float32)
    _deq[qtype](data, 0, data.shape[0], out)
    return out


# ----------------------------------------------------------------------------- small ops
def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray | None = None) -> np.ndarray:
    """RMS-normalize each row of x (..., d) f32 and multiply by weight (d,)."""
    x2 = x.reshape(-1, x.shape[-1])
    if out is None:
        out = np.empty_like(x)
    _ops.rms_norm_rows(x2, weight, np.float32(eps), out.reshape(x2.shape))
    return out


_NO_FACTORS = np.zeros(0, np.float32)


def rope(x: np.ndarray, positions: np.ndarray, n_dims: int, base: float, mode: str = "neox",
         freq_scale: float = 1.0, out: np.ndarray | None = None,
         freq_factors: np.ndarray | None = None) -> np.ndarray:
    """Rotary embedding of x (n_tokens, n_heads, head_dim) f32, in place unless ``out`` given.

    mode "neox" rotates pairs (i, i + n_dims/2), "norm" adjacent pairs (2i, 2i+1); dims from
    n_dims on pass through. theta_i = pos * freq_scale * base**(-2i/n_dims) / freq_factors[i]
    (ggml's ``rope_ext`` frequency factors, e.g. LongRoPE; none: all 1).
    """
    if mode not in ("neox", "norm"):
        raise ValueError(f"rope mode {mode!r}: expected 'neox' or 'norm'")
    if freq_factors is None:
        ff = _NO_FACTORS
    else:
        ff = np.ascontiguousarray(freq_factors, np.float32)
        if ff.shape != (n_dims // 2,):
            raise ValueError(f"rope frequency factors have shape {ff.shape}, expected "
                             f"({n_dims // 2},)")
    if out is None:
        out = x
    _ops.rope_rows(x, np.asarray(positions, np.int64), n_dims, float(base), float(freq_scale),
                   mode == "neox", ff, out)
    return out


def softmax(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Softmax over the last axis of x (..., d) f32."""
    x2 = x.reshape(-1, x.shape[-1])
    if out is None:
        out = np.empty_like(x)
    _ops.softmax_rows(x2, out.reshape(x2.shape))
    return out


def _glu(fn, gate, up, out):
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
        if q in _PREP:
            _mv_driver(q)
    f = np.zeros((1, 2, 4), np.float32)
    rms_norm(f[0], np.ones(4, np.float32), 1e-5)
    rope(f.copy(), np.zeros(1, np.int64), 4, 10000.0, "neox")
    softmax(f[0])
    for fn in (silu_mul, gelu_tanh_mul, relu_mul):
        fn(f, f)
    return time.perf_counter() - t0
