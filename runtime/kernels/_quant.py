"""Block-quantized dot products (decode matvec and prefill matmul) and row dequantizers.

Numerics follow llama.cpp's x86 CPU path: activations are quantized once per call to the
weight type's vec_dot type (Q8_0, Q8_1 or Q8_K), each block's dot product is an exact integer
sum and blocks are scaled and accumulated in float32. Q4_0/Q4_1/Q8_0/Q4_K/Q6_K carry the
activations as int16 and the sums in int32, cast back after every operation (Numba widens
small-integer arithmetic to int64, which would not vectorize); LLVM then emits vpmaddwd.
The other types carry the integer sums in float32 lanes: every partial sum is an integer
below 2**24, so this is exact too, with nibbles and 2-bit fields split in the float domain
(``hi = floor(q / 16)``, ``lo = q - 16 * hi``).

Every driver takes ``w2`` (rows, row_bytes) uint8 raw ggml blocks, ``x`` (n, cols) float32 and
writes ``out`` (n, rows) float32. Decode is the n == 1 case. The prepared decode drivers
``mv_q4_0``/``mv_q4_1``/``mv_q8_0`` (and the float-activation ``mvf_*``) also take the weight's
block scales as float32 (d, m). Each block family has one driver template; the per-type
entry points only name the type.
"""
from __future__ import annotations

import numpy as np
from numba import literally, njit, prange

from pocketlm.quant import type_size
from pocketlm.quant.blocks import MXFP4_VALUES, e8m0_half

from ._base import OPTS, U, f32_at, h2f, round_f16

F = np.float32
PAR = dict(parallel=True, **OPTS)


# --------------------------------------------------------------------- activation quantizers
@njit(**OPTS)
def act_q8_0(x, q8_1):
    """x (n, cols) -> yq (n, cols) int values as f32, yd (n, cols/32), ys (n, cols/32).

    As ggml's AVX2 quantize_row_q8_0/q8_1: id = 127/amax, round half to even, d stored as f16.
    ys is the integer block sum (Q8_0) or f16(d * sum) (Q8_1).
    """
    n, cols = x.shape
    nb = cols // 32
    yq = np.empty((n, cols), np.float32)
    yd = np.empty((n, nb), np.float32)
    ys = np.empty((n, nb), np.float32)
    for t in range(n):
        for b in range(nb):
            amax = F(0)
            for j in range(32):
                amax = max(amax, abs(x[t, b * 32 + j]))
            d = amax / F(127)
            iv = F(127) / amax if amax != F(0) else F(0)
            s = F(0)
            for j in range(32):
                q = np.rint(x[t, b * 32 + j] * iv)
                yq[t, b * 32 + j] = q
                s += q
            yd[t, b] = round_f16(d)
            ys[t, b] = round_f16(d * s) if q8_1 else s
    return yq, yd, ys


@njit(**OPTS)
def act_q8_k(x):
    """x (n, cols) -> yq (n, cols), yd (n, cols/256) f32 scales, bs (n, cols/16) block sums.

    As ggml's quantize_row_q8_K_ref: scale from the signed value of largest magnitude,
    q = min(127, nearest_int(-127/max * x)).
    """
    n, cols = x.shape
    nb = cols // 256
    yq = np.empty((n, cols), np.float32)
    yd = np.empty((n, nb), np.float32)
    bs = np.empty((n, cols // 16), np.float32)
    for t in range(n):
        for b in range(nb):
            amax = F(0)
            mx = F(0)
            for j in range(256):
                v = x[t, b * 256 + j]
                if abs(v) > amax:
                    amax = abs(v)
                    mx = v
            if amax == F(0):
                yd[t, b] = F(0)
                for j in range(256):
                    yq[t, b * 256 + j] = F(0)
                for k in range(16):
                    bs[t, b * 16 + k] = F(0)
                continue
            iscale = F(-127) / mx
            for k in range(16):
                s = F(0)
                for j in range(16):
                    i = b * 256 + k * 16 + j
                    q = min(F(127), np.rint(iscale * x[t, i]))
                    yq[t, i] = q
                    s += q
                bs[t, b * 16 + k] = s
            yd[t, b] = F(1) / iscale
    return yq, yd, bs


# ------------------------------------------------------------------------- field helpers
@njit(inline="always", **OPTS)
def nib(v):
    """byte value (f32) -> (low nibble, high nibble) as f32."""
    hi = np.floor(v * F(0.0625))
    return v - F(16) * hi, hi


@njit(inline="always", **OPTS)
def bit(v, k):
    """bit k of a byte value held in f32."""
    a = np.floor(v * F(1.0 / (1 << k)))
    return a - F(2) * np.floor(a * F(0.5))


@njit(inline="always", **OPTS)
def crumbs(v):
    """byte value (f32) -> its four 2-bit fields, lowest first."""
    a = np.floor(v * F(0.25))
    b = np.floor(v * F(0.0625))
    c = np.floor(v * F(0.015625))
    return v - F(4) * a, a - F(4) * b, b - F(4) * c, c


@njit(inline="always", **OPTS)
def q5_pair(row, qo, qh, j):
    """Q5_0/Q5_1 weights j and j + 16 (as f32, 0..31) of a block whose nibbles start at byte
    qo and whose fifth bits are the word qh. Integer fields: the values are exact, and the
    loop over j vectorizes (float bit tricks did not; 7x on dequantization)."""
    q = np.uint32(row[qo + U(j)])
    lo = (q & np.uint32(15)) | (((qh >> np.uint32(j)) & np.uint32(1)) << np.uint32(4))
    hi = (q >> np.uint32(4)) | (((qh >> np.uint32(j + 16)) & np.uint32(1)) << np.uint32(4))
    return F(I32(lo)), F(I32(hi))


@njit(inline="always", **OPTS)
def word_at(row, o):
    """Four little-endian bytes at o as uint32."""
    return (np.uint32(row[o]) | (np.uint32(row[o + U(1)]) << np.uint32(8)) |
            (np.uint32(row[o + U(2)]) << np.uint32(16)) | (np.uint32(row[o + U(3)]) << np.uint32(24)))


@njit(inline="always", **OPTS)
def scale_min_k4(w, o, j):
    """6-bit (scale, min) of sub-block j from a Q4_K/Q5_K 12-byte scales field at o."""
    if j < 4:
        sc = np.int64(w[o + U(j)]) & 63
        m = np.int64(w[o + U(j + 4)]) & 63
    else:
        sc = (np.int64(w[o + U(j + 4)]) & 0xF) | ((np.int64(w[o + U(j - 4)]) >> 6) << 4)
        m = (np.int64(w[o + U(j + 4)]) >> 4) | ((np.int64(w[o + U(j)]) >> 6) << 4)
    return F(sc), F(m)


@njit(inline="always", **OPTS)
def scale_q3k(w, o, i):
    """signed 6-bit scale i (0..15) of a Q3_K 12-byte scales field at o."""
    lo = (np.int64(w[o + U(i % 8)]) >> (4 * (i // 8))) & 0xF
    hi = (np.int64(w[o + U(8 + i % 4)]) >> (2 * (i // 4))) & 3
    return F((lo | (hi << 4)) - 32)


# ------------------------------------------------------------------------- matmul drivers
# Activations are quantized once per call; weight rows are split across threads and each row
# is reused from L1 for all n activation rows. One template per block family, specialised per
# type by a literal ``kind`` (dead branches fold away), and one entry point per type below.

# Kinds index the block geometry, taken from quant's block table.
NAMES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K",
         "MXFP4")
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K, MXFP4 = range(len(NAMES))
SIZE = tuple(type_size(q) for q in NAMES)
# MXFP4: its codes' values (int16, to meet int16 activations) and its scale bytes as float32
FP4 = MXFP4_VALUES.astype(np.int16)
E8M0 = e8m0_half(np.arange(256, dtype=np.uint8))

I32 = np.int32
I16 = np.int16
ROW_TILE = 8   # weight rows kept in L1 while every activation row passes over them


# 32-blocks: activations are carried as int16 and block sums in int32 (exact), which LLVM
# turns into vpmaddwd; every intermediate is cast back to int32 because Numba would otherwise
# widen to int64 and the block would not vectorize. ~1.7x the f32-lane version. Float math is
# not reassociated (only contracted to FMAs, each unambiguous) so that raw and prepared scales
# round identically whatever LLVM does with the scale's source.
ROW_OPTS = dict(nogil=True, cache=True, fastmath={"nnan", "ninf", "nsz", "afn", "contract"})


@njit(**ROW_OPTS)
def _rows32(kind, w, rb, r0, r1, nb, d, m, yq, yd, ys, out):
    """Rows r0..r1 of a 32-block weight (flat w, rb bytes a row) against one token's
    activations. Prepared weights (d not empty) bring their f16 block scales pre-converted
    to float32 in d (and Q4_1's mins in m), both (rows, nb), made once per weight by
    ``block_scales`` with the same conversion; converting them in the loop (~15 scalar
    instructions per block) was the largest scalar cost of decode. Raw and prepared weights
    run this same machine code, so they round alike."""
    literally(kind)
    prepared = d.shape[0] > 0
    wi = w.view(np.int8)
    for r in range(r0, r1):
        base = U(r) * rb
        acc = F(0)
        for b in range(nb):
            o = base + U(b) * U(SIZE[kind])
            yb = U(b) * U(32)
            if kind == MXFP4:
                sc = E8M0[w[o]]
            else:
                sc = d[r, b] if prepared else h2f(w[o], w[o + U(1)])
            if kind == Q4_0:
                acc += sc * yd[b] * (F(I32(_isum_q4(w, o + U(2), yq, yb))) - F(8) * ys[b])
            elif kind == Q4_1:
                # two adds, each one unambiguous FMA, whichever the scales' source
                acc += sc * yd[b] * F(I32(_isum_q4(w, o + U(4), yq, yb)))
                acc += (m[r, b] if prepared else h2f(w[o + U(2)], w[o + U(3)])) * ys[b]
            elif kind == Q8_0:
                acc += sc * yd[b] * F(I32(_isum_q8(wi, o + U(2), yq, yb)))
            elif kind == Q5_0:
                acc += sc * yd[b] * (_sum_q5(w, o + U(2), o + U(6), yq, yb) - F(16) * ys[b])
            elif kind == MXFP4:
                acc += sc * yd[b] * F(I32(_isum_fp4(w, o + U(1), yq, yb)))
            else:   # Q5_1
                acc += (sc * yd[b] * _sum_q5(w, o + U(4), o + U(8), yq, yb)
                        + h2f(w[o + U(2)], w[o + U(3)]) * ys[b])
        out[r] = acc


@njit(**PAR)
def _mm32(kind, w2, d, m, x, out):
    literally(kind)
    rows, rb, (n, cols) = w2.shape[0], U(w2.shape[1]), x.shape
    w = w2.reshape(-1)
    yq2, yd, ys = act_q8_0(x, kind == Q4_1 or kind == Q5_1)
    yq = yq2.astype(np.int16)
    # Numba hands each worker a contiguous range of row tiles
    for c in prange((rows + ROW_TILE - 1) // ROW_TILE):
        r0 = c * ROW_TILE
        r1 = min(rows, r0 + ROW_TILE)
        for t in range(n):
            _rows32(kind, w, rb, r0, r1, cols // 32, d, m, yq[t], yd[t], ys[t], out[t])


_NONE = np.zeros((0, 0), np.float32)   # no prepared scales: read the f16 ones in place
# Entry points, one per type: (w2, x, out), and with prepared scales (w2, d, m, x, out).
mm_q4_0 = njit(**OPTS)(lambda w2, x, out: _mm32(Q4_0, w2, _NONE, _NONE, x, out))
mm_q4_1 = njit(**OPTS)(lambda w2, x, out: _mm32(Q4_1, w2, _NONE, _NONE, x, out))
mm_q5_0 = njit(**OPTS)(lambda w2, x, out: _mm32(Q5_0, w2, _NONE, _NONE, x, out))
mm_q5_1 = njit(**OPTS)(lambda w2, x, out: _mm32(Q5_1, w2, _NONE, _NONE, x, out))
mm_q8_0 = njit(**OPTS)(lambda w2, x, out: _mm32(Q8_0, w2, _NONE, _NONE, x, out))
mm_mxfp4 = njit(**OPTS)(lambda w2, x, out: _mm32(MXFP4, w2, _NONE, _NONE, x, out))
mv_q4_0 = njit(**OPTS)(lambda w2, d, m, x, out: _mm32(Q4_0, w2, d, m, x, out))
mv_q4_1 = njit(**OPTS)(lambda w2, d, m, x, out: _mm32(Q4_1, w2, d, m, x, out))
mv_q8_0 = njit(**OPTS)(lambda w2, d, m, x, out: _mm32(Q8_0, w2, d, m, x, out))
mv_mxfp4 = njit(**OPTS)(lambda w2, d, m, x, out: _mm32(MXFP4, w2, d, m, x, out))


@njit(inline="always", **OPTS)
def _dot256(kind, w, wi, o, yq, yo, yd, bs, bo):
    if kind == Q4_K:
        return dot_q4_k(w, wi, o, yq, yo, yd, bs, bo)
    if kind == Q5_K:
        return dot_q5_k(w, wi, o, yq, yo, yd, bs, bo)
    if kind == Q6_K:
        return dot_q6_k(w, wi, o, yq, yo, yd, bs, bo)
    if kind == Q2_K:
        return dot_q2_k(w, wi, o, yq, yo, yd, bs, bo)
    if kind == Q3_K:
        return dot_q3_k(w, wi, o, yq, yo, yd, bs, bo)
    return dot_q8_k(w, wi, o, yq, yo, yd, bs, bo)


@njit(**PAR)
def _mm256(kind, w2, x, out):
    literally(kind)
    rows, rb, (n, cols) = w2.shape[0], U(w2.shape[1]), x.shape
    nb = cols // 256
    w = w2.reshape(-1)
    wi = w.view(np.int8)
    yq2, yd, bs2 = act_q8_k(x)          # (n, cols), (n, nb), (n, cols/16)
    yq = yq2.reshape(-1).astype(np.int16)   # int16 x 4/6-bit sums vectorize as in Q4_0
    bs = bs2.reshape(-1)
    for r in prange(rows):
        base = U(r) * rb
        for t in range(n):
            acc = F(0)
            for b in range(nb):
                acc += _dot256(kind, w, wi, base + U(b) * U(SIZE[kind]), yq,
                               U(t * cols + b * 256), yd[t, b], bs, U(t * (cols // 16) + b * 16))
            out[t, r] = acc


mm_q2_k = njit(**OPTS)(lambda w2, x, out: _mm256(Q2_K, w2, x, out))
mm_q3_k = njit(**OPTS)(lambda w2, x, out: _mm256(Q3_K, w2, x, out))
mm_q4_k = njit(**OPTS)(lambda w2, x, out: _mm256(Q4_K, w2, x, out))
mm_q5_k = njit(**OPTS)(lambda w2, x, out: _mm256(Q5_K, w2, x, out))
mm_q6_k = njit(**OPTS)(lambda w2, x, out: _mm256(Q6_K, w2, x, out))
mm_q8_k = njit(**OPTS)(lambda w2, x, out: _mm256(Q8_K, w2, x, out))


# ----------------------------------------------------------------- per-block dot products
# Arguments: w flat uint8 weights (wi: the same bytes as int8), o byte offset of the block,
# yq flat int16 activations, yo offset of the block's first activation; per-block activation
# scalars after that.

@njit(inline="always", **OPTS)
def _isum_q4(w, o, yq, yo):
    """16 bytes of nibbles at o (low nibbles: elements 0..15) times 32 activations, in int32."""
    s = I32(0)
    for j in range(16):
        q = I16(w[o + U(j)])
        s += (I32(I16(q & I16(15)) * yq[yo + U(j)])
              + I32(I16(q >> I16(4)) * yq[yo + U(16 + j)]))
    return s


@njit(inline="always", **OPTS)
def _isum_fp4(w, o, yq, yo):
    """16 bytes of MXFP4 codes at o (low nibbles: elements 0..15) times 32 activations."""
    s = I32(0)
    for j in range(16):
        q = w[o + U(j)]
        s += (I32(FP4[q & np.uint8(15)] * yq[yo + U(j)])
              + I32(FP4[q >> np.uint8(4)] * yq[yo + U(16 + j)]))
    return s


@njit(inline="always", **OPTS)
def _isum_q8(wi, o, yq, yo):
    s = I32(0)
    for j in range(32):
        s += I32(I16(wi[o + U(j)]) * yq[yo + U(j)])
    return s


@njit(inline="always", **OPTS)
def _sum_q5(w, oh, oq, yq, yo):
    # qh: 4 bytes at oh, bit j -> element j; qs: 16 bytes at oq
    s = F(0)
    for k in range(2):
        for i in range(8):
            j = 8 * k + i
            lo, hi = nib(F(w[oq + U(j)]))
            lo += F(16) * bit(F(w[oh + U(k)]), i)
            hi += F(16) * bit(F(w[oh + U(2 + k)]), i)
            s += lo * F(yq[yo + U(j)]) + hi * F(yq[yo + U(16 + j)])
    return s


@njit(**OPTS)
def dot_q8_k(w, wi, o, yq, yo, yd, bs, bo):
    s = F(0)
    for j in range(256):
        s += F(wi[o + U(4 + j)]) * F(yq[yo + U(j)])
    return f32_at(w, o) * yd * s


@njit(**OPTS)
def dot_q4_k(w, wi, o, yq, yo, yd, bs, bo):
    sumi = F(0)
    summ = F(0)
    for c in range(4):
        sc0, m0 = scale_min_k4(w, o + U(4), 2 * c)
        sc1, m1 = scale_min_k4(w, o + U(4), 2 * c + 1)
        s0 = I32(0)
        s1 = I32(0)
        for l in range(32):
            q = I16(w[o + U(16 + 32 * c + l)])
            s0 += I32(I16(q & I16(15)) * yq[yo + U(64 * c + l)])
            s1 += I32(I16(q >> I16(4)) * yq[yo + U(64 * c + 32 + l)])
        sumi += sc0 * F(I32(s0)) + sc1 * F(I32(s1))
        summ += (m0 * (bs[bo + U(4 * c)] + bs[bo + U(4 * c + 1)])
                 + m1 * (bs[bo + U(4 * c + 2)] + bs[bo + U(4 * c + 3)]))
    return yd * (h2f(w[o], w[o + U(1)]) * sumi - h2f(w[o + U(2)], w[o + U(3)]) * summ)


@njit(**OPTS)
def dot_q5_k(w, wi, o, yq, yo, yd, bs, bo):
    sumi = F(0)
    summ = F(0)
    for c in range(4):
        sc0, m0 = scale_min_k4(w, o + U(4), 2 * c)
        sc1, m1 = scale_min_k4(w, o + U(4), 2 * c + 1)
        s0 = F(0)
        s1 = F(0)
        for l in range(32):
            lo, hi = nib(F(w[o + U(48 + 32 * c + l)]))
            h = F(w[o + U(16 + l)])
            lo += F(16) * bit(h, 2 * c)
            hi += F(16) * bit(h, 2 * c + 1)
            s0 += lo * F(yq[yo + U(64 * c + l)])
            s1 += hi * F(yq[yo + U(64 * c + 32 + l)])
        sumi += sc0 * s0 + sc1 * s1
        summ += (m0 * (bs[bo + U(4 * c)] + bs[bo + U(4 * c + 1)])
                 + m1 * (bs[bo + U(4 * c + 2)] + bs[bo + U(4 * c + 3)]))
    return yd * (h2f(w[o], w[o + U(1)]) * sumi - h2f(w[o + U(2)], w[o + U(3)]) * summ)


@njit(**OPTS)
def dot_q6_k(w, wi, o, yq, yo, yd, bs, bo):
    # ql 0..127, qh 128..191, int8 scales 192..207, d 208; q = 6-bit - 32
    tot = F(0)
    for h in range(2):
        for g in range(2):
            s1 = I32(0)
            s2 = I32(0)
            s3 = I32(0)
            s4 = I32(0)
            for i in range(16):
                l = 16 * g + i
                qa = I16(w[o + U(64 * h + l)])
                qb = I16(w[o + U(64 * h + 32 + l)])
                qc = I16(w[o + U(128 + 32 * h + l)])
                yb = yo + U(128 * h + l)
                s1 += I32(I16((qa & I16(15)) | ((qc & I16(3)) << I16(4))) * yq[yb])
                s2 += I32(I16((qb & I16(15)) | ((qc & I16(12)) << I16(2))) * yq[yb + U(32)])
                s3 += I32(I16((qa >> I16(4)) | (qc & I16(48))) * yq[yb + U(64)])
                s4 += I32(I16((qb >> I16(4)) | ((qc >> I16(2)) & I16(48))) * yq[yb + U(96)])
            so = o + U(192 + 8 * h + g)
            sb = bo + U(8 * h + g)
            tot += (F(wi[so]) * (F(I32(s1)) - F(32) * bs[sb])
                    + F(wi[so + U(2)]) * (F(I32(s2)) - F(32) * bs[sb + U(2)])
                    + F(wi[so + U(4)]) * (F(I32(s3)) - F(32) * bs[sb + U(4)])
                    + F(wi[so + U(6)]) * (F(I32(s4)) - F(32) * bs[sb + U(6)]))
    return h2f(w[o + U(208)], w[o + U(209)]) * yd * tot


@njit(**OPTS)
def dot_q2_k(w, wi, o, yq, yo, yd, bs, bo):
    # scales 0..15 (low nibble scale, high nibble min), qs 16..79, d 80, dmin 82
    sumi = F(0)
    summ = F(0)
    for h in range(2):
        for g in range(2):
            s0 = F(0)
            s1 = F(0)
            s2 = F(0)
            s3 = F(0)
            for i in range(16):
                l = 16 * g + i
                c0, c1, c2, c3 = crumbs(F(w[o + U(16 + 32 * h + l)]))
                yb = yo + U(128 * h + l)
                s0 += c0 * F(yq[yb])
                s1 += c1 * F(yq[yb + U(32)])
                s2 += c2 * F(yq[yb + U(64)])
                s3 += c3 * F(yq[yb + U(96)])
            for k in range(4):
                sc, m = nib(F(w[o + U(8 * h + 2 * k + g)]))
                sk = s0 if k == 0 else (s1 if k == 1 else (s2 if k == 2 else s3))
                sumi += sc * sk
                summ += m * bs[bo + U(8 * h + 2 * k + g)]
    return yd * (h2f(w[o + U(80)], w[o + U(81)]) * sumi - h2f(w[o + U(82)], w[o + U(83)]) * summ)


@njit(**OPTS)
def dot_q3_k(w, wi, o, yq, yo, yd, bs, bo):
    # hmask 0..31, qs 32..95, scales 96..107, d 108; q = 2-bit + 4*hbit - 4
    tot = F(0)
    for h in range(2):
        for g in range(2):
            s0 = F(0)
            s1 = F(0)
            s2 = F(0)
            s3 = F(0)
            for i in range(16):
                l = 16 * g + i
                c0, c1, c2, c3 = crumbs(F(w[o + U(32 + 32 * h + l)]))
                m = F(w[o + U(l)])
                yb = yo + U(128 * h + l)
                s0 += (c0 + F(4) * bit(m, 4 * h)) * F(yq[yb])
                s1 += (c1 + F(4) * bit(m, 4 * h + 1)) * F(yq[yb + U(32)])
                s2 += (c2 + F(4) * bit(m, 4 * h + 2)) * F(yq[yb + U(64)])
                s3 += (c3 + F(4) * bit(m, 4 * h + 3)) * F(yq[yb + U(96)])
            for k in range(4):
                isub = 8 * h + 2 * k + g
                sk = s0 if k == 0 else (s1 if k == 1 else (s2 if k == 2 else s3))
                tot += scale_q3k(w, o + U(96), isub) * (sk - F(4) * bs[bo + U(isub)])
    return h2f(w[o + U(108)], w[o + U(109)]) * yd * tot


@njit(inline="always", **OPTS)
def _row_scales(row, bsz, off, dst_row):
    for b in range(dst_row.shape[0]):
        o = U(b * bsz + off)
        dst_row[b] = h2f(row[o], row[o + U(1)])


@njit(**PAR)
def block_scales(w2, bsz, off, dst):
    """f16 field at byte ``off`` of every ``bsz``-byte block of w2 -> dst (rows, nb) float32."""
    for r in prange(dst.shape[0]):
        _row_scales(w2[r], bsz, off, dst[r])


# ------------------------------------------------------------------------ dequantization
# deq_<t>(w2, r0, r1, dst): rows r0..r1 of w2 -> dst (r1 - r0, cols) float32, threads over rows.

# A block's loop bound LLVM cannot fold (it is 16 or 32 whenever there are columns) keeps the
# loop a loop, which the loop vectorizer takes; fully unrolled, the SLP vectorizer left these
# scalar (Q4_0 2.3 -> 6.8, Q8_0 2.2 -> 8-11 G weights/s on one core). Nibbles come from the
# bytes read as int8 and masked in int32, which vectorizes where uint8 arithmetic (widened
# to int64 by Numba) does not.
@njit(**PAR)
def deq_q4_0(w2, r0, r1, dst):
    cols = dst.shape[1]
    half = 16 if cols > 0 else 0
    for r in prange(r1 - r0):
        row = w2[r0 + r]
        ri = row.view(np.int8)
        for b in range(cols // 32):
            o = U(b * 18)
            d = h2f(row[o], row[o + U(1)])
            for j in range(half):
                q = I32(ri[o + U(2 + j)])
                dst[r, b * 32 + j] = d * F(I32(q & I32(15)) - I32(8))
                dst[r, b * 32 + 16 + j] = d * F(I32(I32(q >> I32(4)) & I32(15)) - I32(8))


@njit(**PAR)
def deq_q4_1(w2, r0, r1, dst):
    cols = dst.shape[1]
    half = 16 if cols > 0 else 0
    for r in prange(r1 - r0):
        row = w2[r0 + r]
        ri = row.view(np.int8)
        for b in range(cols // 32):
            o = U(b * 20)
            d = h2f(row[o], row[o + U(1)])
            m = h2f(row[o + U(2)], row[o + U(3)])
            for j in range(half):
                q = I32(ri[o + U(4 + j)])
                dst[r, b * 32 + j] = d * F(I32(q & I32(15))) + m
                dst[r, b * 32 + 16 + j] = d * F(I32(I32(q >> I32(4)) & I32(15))) + m


@njit(**PAR)
def deq_q5_0(w2, r0, r1, dst):
    cols = dst.shape[1]
    for r in prange(r1 - r0):
        row = w2[r0 + r]
        for b in range(cols // 32):
            o = U(b * 22)
            d = h2f(row[o], row[o + U(1)])
            qh = word_at(row, o + U(2))
            for j in range(16):
                lo, hi = q5_pair(row, o + U(6), qh, j)
                dst[r, b * 32 + j] = d * (lo - F(16))
                dst[r, b * 32 + 16 + j] = d * (hi - F(16))


@njit(**PAR)
def deq_q5_1(w2, r0, r1, dst):
    cols = dst.shape[1]
    for r in prange(r1 - r0):
        row = w2[r0 + r]
        for b in range(cols // 32):
            o = U(b * 24)
            d = h2f(row[o], row[o + U(1)])
            m = h2f(row[o + U(2)], row[o + U(3)])
            qh = word_at(row, o + U(4))
            for j in range(16):
                lo, hi = q5_pair(row, o + U(8), qh, j)
                dst[r, b * 32 + j] = d * lo + m
                dst[r, b * 32 + 16 + j] = d * hi + m


@njit(**PAR)
def deq_q8_0(w2, r0, r1, dst):
    cols = dst.shape[1]
    block = 32 if cols > 0 else 0   # see deq_q4_0
    for r in prange(r1 - r0):
        row = w2[r0 + r]
        ri = row.view(np.int8)
        for b in range(cols // 32):
            o = U(b * 34)
            d = h2f(row[o], row[o + U(1)])
            for j in range(block):
                dst[r, b * 32 + j] = d * F(ri[o + U(2 + j)])


@njit(**PAR)
def deq_mxfp4(w2, r0, r1, dst):
    cols = dst.shape[1]
    for r in prange(r1 - r0):
        row = w2[r0 + r]
        for b in range(cols // 32):
            o = U(b * 17)
            d = E8M0[row[o]]
            for j in range(16):
                q = row[o + U(1 + j)]
                dst[r, b * 32 + j] = F(FP4[q & np.uint8(15)]) * d
                dst[r, b * 32 + 16 + j] = F(FP4[q >> np.uint8(4)]) * d


@njit(**PAR)
def deq_q8_k(w2, r0, r1, dst):
    cols = dst.shape[1]
    for r in prange(r1 - r0):
        row = w2[r0 + r]
        ri = row.view(np.int8)
        for b in range(cols // 256):
            o = U(b * 292)
            d = f32_at(row, o)
            for j in range(256):
                dst[r, b * 256 + j] = d * F(ri[o + U(4 + j)])


@njit(**PAR)
def deq_q4_k(w2, r0, r1, dst):
    cols = dst.shape[1]
    for r in prange(r1 - r0):
        row = w2[r0 + r]
        for b in range(cols // 256):
            o = U(b * 144)
            d = h2f(row[o], row[o + U(1)])
            dm = h2f(row[o + U(2)], row[o + U(3)])
            for c in range(4):
                sc0, m0 = scale_min_k4(row, o + U(4), 2 * c)
                sc1, m1 = scale_min_k4(row, o + U(4), 2 * c + 1)
                for l in range(32):
                    lo, hi = nib(F(row[o + U(16 + 32 * c + l)]))
                    dst[r, b * 256 + 64 * c + l] = d * sc0 * lo - dm * m0
                    dst[r, b * 256 + 64 * c + 32 + l] = d * sc1 * hi - dm * m1


@njit(**PAR)
def deq_q5_k(w2, r0, r1, dst):
    cols = dst.shape[1]
    for r in prange(r1 - r0):
        row = w2[r0 + r]
        for b in range(cols // 256):
            o = U(b * 176)
            d = h2f(row[o], row[o + U(1)])
            dm = h2f(row[o + U(2)], row[o + U(3)])
            for c in range(4):
                sc0, m0 = scale_min_k4(row, o + U(4), 2 * c)
                sc1, m1 = scale_min_k4(row, o + U(4), 2 * c + 1)
                for l in range(32):
                    lo, hi = nib(F(row[o + U(48 + 32 * c + l)]))
                    h = F(row[o + U(16 + l)])
                    lo += F(16) * bit(h, 2 * c)
                    hi += F(16) * bit(h, 2 * c + 1)
                    dst[r, b * 256 + 64 * c + l] = d * sc0 * lo - dm * m0
                    dst[r, b * 256 + 64 * c + 32 + l] = d * sc1 * hi - dm * m1


@njit(**PAR)
def deq_q6_k(w2, r0, r1, dst):
    # integer fields (exact, as float tricks were) in runs of 16 weights sharing their
    # scales: it vectorizes
    cols = dst.shape[1]
    for r in prange(r1 - r0):
        row = w2[r0 + r]
        ri = row.view(np.int8)
        for b in range(cols // 256):
            o = U(b * 210)
            d = h2f(row[o + U(208)], row[o + U(209)])
            for h in range(2):
                for half in range(2):
                    so = o + U(192 + 8 * h + half)
                    s0, s1 = d * F(ri[so]), d * F(ri[so + U(2)])
                    s2, s3 = d * F(ri[so + U(4)]), d * F(ri[so + U(6)])
                    for m in range(16):
                        l = 16 * half + m
                        a = I32(row[o + U(64 * h + l)])
                        bb = I32(row[o + U(64 * h + 32 + l)])
                        c = I32(row[o + U(128 + 32 * h + l)])
                        y = b * 256 + 128 * h + l
                        dst[r, y] = s0 * F(((a & 15) | ((c & 3) << 4)) - 32)
                        dst[r, y + 32] = s1 * F(((bb & 15) | (((c >> 2) & 3) << 4)) - 32)
                        dst[r, y + 64] = s2 * F(((a >> 4) | (((c >> 4) & 3) << 4)) - 32)
                        dst[r, y + 96] = s3 * F(((bb >> 4) | ((c >> 6) << 4)) - 32)


@njit(**PAR)
def deq_q2_k(w2, r0, r1, dst):
    cols = dst.shape[1]
    for r in prange(r1 - r0):
        row = w2[r0 + r]
        for b in range(cols // 256):
            o = U(b * 84)
            d = h2f(row[o + U(80)], row[o + U(81)])
            dm = h2f(row[o + U(82)], row[o + U(83)])
            for h in range(2):
                for l in range(32):
                    c = crumbs(F(row[o + U(16 + 32 * h + l)]))
                    for k in range(4):
                        sc, m = nib(F(row[o + U(8 * h + 2 * k + l // 16)]))
                        dst[r, b * 256 + 128 * h + 32 * k + l] = d * sc * c[k] - dm * m


@njit(**PAR)
def deq_q3_k(w2, r0, r1, dst):
    cols = dst.shape[1]
    for r in prange(r1 - r0):
        row = w2[r0 + r]
        for b in range(cols // 256):
            o = U(b * 110)
            d = h2f(row[o + U(108)], row[o + U(109)])
            for h in range(2):
                for l in range(32):
                    c = crumbs(F(row[o + U(32 + 32 * h + l)]))
                    m = F(row[o + U(l)])
                    for k in range(4):
                        sc = scale_q3k(row, o + U(96), 8 * h + 2 * k + l // 16)
                        q = c[k] + F(4) * bit(m, 4 * h + k) - F(4)
                        dst[r, b * 256 + 128 * h + 32 * k + l] = d * sc * q


# Float-activation ("exact") variants: x stays float32, weights are dequantized in registers
# and only the f32 rounding of the sums separates the result from exact math. Block sums of
# x (xs) carry Q4_0's -8 offset and Q4_1's min term. Reassociation is allowed here so the
# 32-term block sums vectorize. Scales are read from the blocks themselves (one f16
# conversion per 32 float products is cheap beside them), so these weights carry no
# prepared side arrays: 21 MiB for Gemma 3's Q8_0 output head, which prompts reach.
@njit(**OPTS)
def _row32f(kind, w, wi, r, rb, nb, x, xs):
    """Row r of a 32-block weight against one token's float activations x (block sums xs)."""
    literally(kind)
    acc = F(0)
    for b in range(nb):
        o = U(r) * rb + U(b) * U(SIZE[kind])
        xb = U(b) * U(32)
        s = F(0)
        if kind == Q8_0:
            for j in range(32):
                s += F(wi[o + U(2 + j)]) * x[xb + U(j)]
            acc += h2f(w[o], w[o + U(1)]) * s
        elif kind == MXFP4:
            for j in range(16):
                q = w[o + U(1 + j)]
                s += (F(FP4[q & np.uint8(15)]) * x[xb + U(j)]
                      + F(FP4[q >> np.uint8(4)]) * x[xb + U(16 + j)])
            acc += E8M0[w[o]] * s
        else:
            qo = o + U(2 if kind == Q4_0 else 4)
            for j in range(16):
                q = I32(w[qo + U(j)])
                s += F(q & I32(15)) * x[xb + U(j)] + F(q >> I32(4)) * x[xb + U(16 + j)]
            d = h2f(w[o], w[o + U(1)])
            if kind == Q4_0:
                acc += d * (s - F(8) * xs[b])
            else:
                acc += d * s + h2f(w[o + U(2)], w[o + U(3)]) * xs[b]
    return acc


@njit(**OPTS)
def _block_sums(x):
    """x (n, cols) -> (n, cols/32) float32 sums of each 32-block."""
    n, cols = x.shape
    xs = np.zeros((n, cols // 32), np.float32)
    for t in range(n):
        for b in range(cols // 32):
            s = F(0)
            for j in range(32):
                s += x[t, b * 32 + j]
            xs[t, b] = s
    return xs


@njit(**PAR)
def _mvf(kind, w2, x, out):
    literally(kind)
    rows, rb, (n, cols) = w2.shape[0], U(w2.shape[1]), x.shape
    w = w2.reshape(-1)
    wi = w.view(np.int8)
    xs = _block_sums(x)
    for c in prange((rows + ROW_TILE - 1) // ROW_TILE):
        for t in range(n):
            for r in range(c * ROW_TILE, min(rows, (c + 1) * ROW_TILE)):
                out[t, r] = _row32f(kind, w, wi, r, rb, cols // 32, x[t], xs[t])


mvf_q4_0 = njit(**OPTS)(lambda w2, x, out: _mvf(Q4_0, w2, x, out))
mvf_q4_1 = njit(**OPTS)(lambda w2, x, out: _mvf(Q4_1, w2, x, out))
mvf_q8_0 = njit(**OPTS)(lambda w2, x, out: _mvf(Q8_0, w2, x, out))
mvf_mxfp4 = njit(**OPTS)(lambda w2, x, out: _mvf(MXFP4, w2, x, out))


# Selected rows only (ReLU-gated FFNs skip the rows whose gate is zero). Each row runs the
# full drivers' row function; LLVM may still order its block sums differently here (the
# sums are reassociable), so results agree to float32 rounding.
@njit(**PAR)
def _mvf_rows(kind, w2, x, idx, out):
    literally(kind)
    rb, w, cols = U(w2.shape[1]), w2.reshape(-1), x.shape[1]
    wi = w.view(np.int8)
    xs = _block_sums(x)
    for i in prange(idx.shape[0]):
        out[idx[i]] = _row32f(kind, w, wi, idx[i], rb, cols // 32, x[0], xs[0])


mvf_rows_q4_0 = njit(**OPTS)(lambda w2, x, i, out: _mvf_rows(Q4_0, w2, x, i, out))
mvf_rows_q4_1 = njit(**OPTS)(lambda w2, x, i, out: _mvf_rows(Q4_1, w2, x, i, out))
mvf_rows_q8_0 = njit(**OPTS)(lambda w2, x, i, out: _mvf_rows(Q8_0, w2, x, i, out))
mvf_rows_mxfp4 = njit(**OPTS)(lambda w2, x, i, out: _mvf_rows(MXFP4, w2, x, i, out))
