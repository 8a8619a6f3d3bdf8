"""Decode matvec on a load-time repacked layout of Q4_0 / Q4_1 / Q8_0 weights.

The raw ggml layout puts one f16 scale in front of every 32-element block, so the raw kernels
pay per block a scalar f16 conversion and a horizontal reduction. Here each row's blocks are
grouped by 8 and stored transposed, lanes = blocks: byte j of the 8 blocks of a group lie
next to each other, and the scales are float32 vectors of 8. The inner loop then runs 8
independent block sums in one SIMD register, scales them with one vector multiply per group
and reduces horizontally once per row.

Numerics are those of the raw kernels (llama.cpp's): the activation is quantized by the same
``act_q8_0``, every block sum is an integer below 2**24 (exact in f32 lanes) and blocks are
scaled as d_w * d_x * sum (+ m * s for Q4_1) and accumulated in f32; only the order in which
block terms are added differs (8 lane accumulators), ~1e-7 relative.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..tensor import QTensor
from ._base import OPTS, U, block_codegen
from ._quant import act_q8_0

F = np.float32
I32 = np.int32
PAR = dict(parallel=True, **OPTS)
LANES = 8          # blocks per group = f32 lanes of an AVX2 register
ROW_TILE = 8       # rows per parallel work item
PACKED_TYPES = ("Q4_0", "Q4_1", "Q8_0")
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


@dataclass(frozen=True)
class PackedWeight:
    """A Q4_0/Q4_1/Q8_0 weight regrouped for ``matvec_packed``; see the module docstring."""
    qtype: str
    rows: int
    cols: int
    d: np.ndarray            # (rows, groups, 8) f32 block scales; 0 in padding blocks
    m: np.ndarray | None     # (rows, groups, 8) f32 block mins (Q4_1 only)
    qs: np.ndarray           # Q4_x: (rows, groups, 16, 8) uint8; Q8_0: (rows, groups, 32, 8) int8

    @property
    def nbytes(self) -> int:
        return self.d.nbytes + self.qs.nbytes + (0 if self.m is None else self.m.nbytes)


@dataclass(frozen=True)
class PackedQTensor(QTensor):
    """A QTensor that also carries its ``PackedWeight`` (see ``runtime.kernels.prepare``)."""
    packed: PackedWeight | None = None


def pack(qtype: str, data: np.ndarray, cols: int) -> PackedWeight:
    """Regroup raw blocks ``data`` (rows, row_bytes) uint8 of a Q4_0/Q4_1/Q8_0 weight.

    Done once at load time; costs about the memory of the raw weight (+2 bytes per block).
    """
    if qtype not in _BLOCK_BYTES:
        raise NotImplementedError(f"no packed layout for {qtype}")
    bs = _BLOCK_BYTES[qtype]
    rows, nb = data.shape[0], cols // 32
    if cols % 32 or data.shape[1] != nb * bs:
        raise ValueError(f"{qtype}: {cols} columns do not match row bytes {data.shape[1]}")
    ng = -(-nb // LANES)
    blocks = np.zeros((rows, ng * LANES, bs), np.uint8)   # zero blocks pad the last group
    blocks[:, :nb] = data.reshape(rows, nb, bs)
    f16 = lambda o: blocks[..., o:o + 2].copy().view(np.float16)[..., 0].astype(np.float32)
    d = f16(0).reshape(rows, ng, LANES)
    m = None
    if qtype == "Q4_1":
        m = f16(2).reshape(rows, ng, LANES)
    q = blocks[..., bs - (32 if qtype == "Q8_0" else 16):]          # (rows, ng*8, nq)
    q = q.reshape(rows, ng, LANES, -1).transpose(0, 1, 3, 2)        # (rows, ng, nq, 8)
    q = np.ascontiguousarray(q)
    if qtype == "Q8_0":
        q = q.view(np.int8)
    return PackedWeight(qtype, rows, cols, np.ascontiguousarray(d),
                        None if m is None else np.ascontiguousarray(m), q)


@njit(**OPTS)
def _act(x, q8_1):
    """x (n, cols) -> transposed activations xq (n, ng, 32, 8), dx (n, ng, 8), xs (n, ng, 8).

    xq holds the quantized integers as f32, dx the f16-rounded scales, xs the block sums
    (Q8_0) or f16(d * sum) (Q8_1); padding blocks are zero.
    """
    n, cols = x.shape
    nb = cols // 32
    ng = (nb + LANES - 1) // LANES
    yq, yd, ys = act_q8_0(x, q8_1)
    xq = np.zeros((n, ng, 32, LANES), np.float32)
    dx = np.zeros((n, ng, LANES), np.float32)
    xs = np.zeros((n, ng, LANES), np.float32)
    for t in range(n):
        for b in range(nb):
            g, l = b // LANES, b % LANES
            dx[t, g, l] = yd[t, b]
            xs[t, g, l] = ys[t, b]
            for j in range(32):
                xq[t, g, j, l] = yq[t, b * 32 + j]
    return xq, dx, xs


# Row kernels index flat arrays with unsigned offsets and constant strides (no negative-index
# wraparound selects) and keep the lane sums in scalars: a local array would go through memory
# that LLVM cannot prove distinct from the inputs, which stops the SLP vectorizer. Each lane
# sums into 4 partials (integers below 2**24, so exact in any order): one chain of 32
# dependent FMAs per group would cost 4 cycles each and cap the kernel at ~3.5 GB/s.
# The lane-unrolled bodies are generated from the one-lane templates below.
# d, m: (rows*ng*8,) f32; qs: (rows*ng*nq*8,); xq: (ng*32*8,) f32, dx, xs: (ng*8,) f32.
_ROWS_SRC = """
def _rows(d, m, qs, r0, r1, ng, xq, dx, xs, out):
    for r in range(r0, r1):
{zero_acc}
        for g in range(ng):
            wo = (U(r) * U(ng) + U(g)) * U({nq} * 8)
            xo = U(g) * U(256)
            so = (U(r) * U(ng) + U(g)) * U(8)
            ao = U(g) * U(8)
{zero_s}
            for i in range({nq} // {step}):
{body}
{scale}
        out[r] = {total}
"""
# Per lane L: update of partial sums P0..P3 for quant byte(s) j (Q4: 2 bytes per step, low
# nibbles -> P0/P1, high -> P2/P3; Q8: 4 bytes per step), then the block's scaled term of sL.
_Q4 = ["q = I32(qs[wo + U(8 * (2 * i + u) + L)])",
       "Pu += F(I32(q & I32(15))) * xq[xo + U(8 * (2 * i + u) + L)]",
       "Pv += F(I32(q >> I32(4))) * xq[xo + U(8 * (2 * i + u) + 128 + L)]"]
_BODY = {
    "Q4_0": (_Q4, 2, "aL += d[so + U(L)] * dx[ao + U(L)] * (sL - F(8) * xs[ao + U(L)])", 16),
    "Q4_1": (_Q4, 2, "aL += d[so + U(L)] * dx[ao + U(L)] * sL + m[so + U(L)] * xs[ao + U(L)]", 16),
    "Q8_0": (["Pu += F(I32(qs[wo + U(8 * (4 * i + u) + L)])) * xq[xo + U(8 * (4 * i + u) + L)]"], 4,
             "aL += d[so + U(L)] * dx[ao + U(L)] * sL", 32),
}


def _make_rows(qtype):
    upd, step, scale, nq = _BODY[qtype]
    lanes = range(LANES)

    def sub(text, l, u=0):
        text = text.replace("Pu", f"p{l}_{u}").replace("Pv", f"p{l}_{u + 2}").replace("u)", f"{u})")
        return text.replace("sL", f"s{l}").replace("aL", f"a{l}").replace("L)", f"{l})")

    body = [sub(line, l, u) for u in range(step) for l in lanes for line in upd]
    scale_lines = [f"s{l} = (p{l}_0 + p{l}_1) + (p{l}_2 + p{l}_3)" for l in lanes]
    src = _ROWS_SRC.format(
        nq=nq, step=step,
        zero_acc="\n".join(f"        a{l} = F(0)" for l in lanes),
        zero_s="\n".join(f"            p{l}_{k} = F(0)" for l in lanes for k in range(4)),
        body="\n".join("                " + b for b in body),
        scale="\n".join("            " + t for t in scale_lines + [sub(scale, l) for l in lanes]),
        total=" + ".join(f"a{l}" for l in lanes))
    ns = {"U": U, "F": F, "I32": I32}
    exec(compile(src, f"<packed rows {qtype}>", "exec"), ns)
    # exec'd source has no file for Numba's cache; the callers' cached code embeds it.
    # No 'reassoc': LLVM would fold the 4 partial sums back into one dependent chain.
    return njit(**{**OPTS, "cache": False, "fastmath": OPTS["fastmath"] - {"reassoc"}})(ns["_rows"])


_rows_q4_0 = _make_rows("Q4_0")
_rows_q4_1 = _make_rows("Q4_1")
_rows_q8_0 = _make_rows("Q8_0")


def _driver(rows_fn, q8_1):
    @njit(**PAR)
    def mv(d3, m3, qs4, x, out):
        rows, ng = qs4.shape[0], qs4.shape[1]
        xq4, dx3, xs3 = _act(x, q8_1)       # (n, ng, 32, 8), (n, ng, 8), (n, ng, 8)
        d, m, qs = d3.reshape(-1), m3.reshape(-1), qs4.reshape(-1)
        for c in prange((rows + ROW_TILE - 1) // ROW_TILE):
            r0 = c * ROW_TILE
            r1 = min(rows, r0 + ROW_TILE)
            for t in range(x.shape[0]):
                rows_fn(d, m, qs, r0, r1, ng, xq4[t].reshape(-1), dx3[t].reshape(-1),
                        xs3[t].reshape(-1), out[t])
    return mv


# driver(d (rows, ng, 8) f32, m (rows, ng, 8) f32 (= d where unused), qs (rows, ng, nq, 8),
#        x (n, cols) f32, out (n, rows) f32)
mv_q4_0 = _driver(_rows_q4_0, False)
mv_q4_1 = _driver(_rows_q4_1, True)
mv_q8_0 = _driver(_rows_q8_0, False)


def matvec_packed(pw: PackedWeight, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x (cols,) or (n, cols) f32 times the packed weight -> (rows,) or (n, rows) f32."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    x2 = x.reshape(-1, pw.cols) if x.ndim == 1 else x
    if x2.shape[1] != pw.cols or x.ndim > 2:
        raise ValueError(f"x has shape {x.shape}, weight has {pw.cols} columns")
    if out is None:
        out = np.empty((x2.shape[0], pw.rows) if x.ndim == 2 else pw.rows, np.float32)
    o2 = out.reshape(x2.shape[0], pw.rows)
    fn = {"Q4_0": mv_q4_0, "Q4_1": mv_q4_1, "Q8_0": mv_q8_0}[pw.qtype]
    args = (pw.d, pw.d if pw.m is None else pw.m, pw.qs, x2, o2)
    if not fn.signatures:      # first call compiles (or loads) with the block-kernel settings
        with block_codegen():
            fn(*args)
    else:
        fn(*args)
    return out
