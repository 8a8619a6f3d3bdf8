"""Scaled dot-product attention over a KV cache (causal, sliding-window, GQA).

The cache is a set of slots, each holding one position's key and value; ``slot_pos`` says which
position a slot holds (-1: empty). Masking by positions instead of by slot order lets the same
code serve a plain cache, a ring buffer for sliding-window layers and cache reuse across turns.

Decode runs a Numba kernel (one, compiled for each cache type it meets); prompts run
per-KV-head matrix products in BLAS.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._base import VEC_OPTS, exp_f32, load_f32, round_f16, tanh_f32
from ._pool import parallel_for

# Prefill queries per BLAS task: causal tiles skip the keys after their last query.
_QUERY_TILE = 64


_NEG = np.float32(-1e30)  # masked score: finite, because fastmath assumes no infinities
_ZERO = np.float32(0.0)
_NO_SINKS = np.zeros(0, np.float32)


@njit(**VEC_OPTS)
def _softmax_masked(sc, row_pos, slot_pos, scale, window, softcap, f16, sinks):
    """Scores sc (m, S) -> attention weights in place. Row i belongs to a query at position
    row_pos[i]; column s to the key held at slot_pos[s] (-1: empty). Rows that see no key
    become zeros. ``sinks`` (m,) or empty: a logit per row that joins the softmax's
    normalization but has no value (gpt-oss's attention sinks, as llama.cpp adds them). ``f16``: weights rounded to float16, as llama.cpp's attention (without
    flash attention) converts them for the product with its F16 values. Each pass but that
    rounding is branch-free so that it vectorizes."""
    m_rows, S = sc.shape
    for i in range(m_rows):
        p = row_pos[i]
        row = sc[i]
        for s in range(S):
            row[s] *= scale
        if softcap > 0.0:
            for s in range(S):
                row[s] = softcap * tanh_f32(row[s] / softcap)
        mx = _NEG
        for s in range(S):
            sp = slot_pos[s]
            seen = (sp >= 0) & (sp <= p) & ((window <= 0) | (p - sp < window))
            x = row[s] if seen else _NEG
            row[s] = x
            mx = max(mx, x)
        if sinks.shape[0] > 0:
            mx = max(mx, sinks[i])
        if mx <= _NEG:
            for s in range(S):
                row[s] = np.float32(0.0)
            continue
        total = np.float32(0.0)
        for s in range(S):
            w = exp_f32(row[s] - mx)   # masked: exp(-1e30) is 0
            row[s] = w
            total += w
        if sinks.shape[0] > 0:
            total += exp_f32(sinks[i] - mx)
        inv = np.float32(1.0) / total
        for s in range(S):
            row[s] *= inv
        if f16:
            for s in range(S):
                row[s] = round_f16(row[s])


@njit(inline="always", **VEC_OPTS)
def _axpy4(acc, n, c0, c1, c2, c3, r0, r1, r2, r3):
    """acc[:n] += c0 r0 + c1 r1 + c2 r2 + c3 r3: four rows per pass over acc keep its loads
    and stores few. The rows are float32 or halves (``load_f32``)."""
    for i in range(n):
        acc[i] += (c0 * load_f32(r0, i) + c1 * load_f32(r1, i) + c2 * load_f32(r2, i)
                   + c3 * load_f32(r3, i))


@njit(**VEC_OPTS)
def _attend_head(q, kt, v, slot_pos, n_slots, q_pos, scale, window, softcap, f16, sinks,
                 out, t, h, sc):
    # One query token and head. Keys are stored transposed, kt (KVH, D, S), so each score
    # update is a contiguous run over slots (vectorizes).
    D = q.shape[2]
    kh = h // (q.shape[1] // kt.shape[0])
    row = sc[0]
    qh = q[t, h]
    row[:] = 0.0
    for d in range(0, D - 3, 4):
        _axpy4(row, n_slots, qh[d], qh[d + 1], qh[d + 2], qh[d + 3],
               kt[kh, d], kt[kh, d + 1], kt[kh, d + 2], kt[kh, d + 3])
    for d in range(D - D % 4, D):
        _axpy4(row, n_slots, qh[d], _ZERO, _ZERO, _ZERO, kt[kh, d], kt[kh, d], kt[kh, d], kt[kh, d])
    _softmax_masked(sc, q_pos[t:t + 1], slot_pos, scale, window, softcap, f16,
                    sinks[h:h + 1] if sinks.shape[0] > 0 else sinks)
    acc = out[t, h]
    acc[:] = 0.0
    for s in range(0, n_slots - 3, 4):
        _axpy4(acc, D, row[s], row[s + 1], row[s + 2], row[s + 3],
               v[s, kh], v[s + 1, kh], v[s + 2, kh], v[s + 3, kh])
    for s in range(n_slots - n_slots % 4, n_slots):
        _axpy4(acc, D, row[s], _ZERO, _ZERO, _ZERO, v[s, kh], v[s, kh], v[s, kh], v[s, kh])


@njit(parallel=True, **VEC_OPTS)
def _attend_parallel(q, kt, v, slot_pos, n_slots, q_pos, scale, window, softcap, f16, sinks,
                     out):
    H = q.shape[1]
    for idx in prange(q.shape[0] * H):
        sc = np.empty((1, n_slots), np.float32)
        t = idx // H
        _attend_head(q, kt, v, slot_pos, n_slots, q_pos, scale, window, softcap, f16, sinks,
                     out, t, idx - t * H, sc)


def _attend_blas(q, kt, v, slot_pos, n_slots, q_pos, scale, window, softcap, f16, sinks, out):
    # Per KV head and tile of queries: scores by BLAS over the slots the tile can see, mask
    # and softmax in a kernel, weighted values by BLAS. Tasks run on the worker threads.
    n, H, D = q.shape
    KVH = kt.shape[0]
    g = H // KVH
    sp = slot_pos[:n_slots]
    tiles = [(t0, min(n, t0 + _QUERY_TILE)) for t0 in range(0, n, _QUERY_TILE)]
    spans = []
    for t0, t1 in tiles:
        p = q_pos[t0:t1]
        seen = (sp >= 0) & (sp <= p.max())
        if window > 0:
            seen &= sp > p.min() - window
        idx = np.flatnonzero(seen)
        spans.append((int(idx[0]), int(idx[-1]) + 1) if len(idx) else (0, 0))
    vv = [np.ascontiguousarray(v[:n_slots, kh]) for kh in range(KVH)]   # (S, D) each
    row_pos = [np.repeat(q_pos[t0:t1], g) for t0, t1 in tiles]          # (tile*g,) each
    # rows of a tile are (token, head in the group): each head's sink repeats per token
    row_sinks = [np.tile(sinks[kh * g:(kh + 1) * g], _QUERY_TILE) if len(sinks) else sinks
                 for kh in range(KVH)]

    def task(i):
        kh, j = divmod(i, len(tiles))
        (t0, t1), (lo, hi) = tiles[j], spans[j]
        if hi == lo:
            out[t0:t1, kh * g:(kh + 1) * g] = 0.0
            return
        qq = q[t0:t1, kh * g:(kh + 1) * g].reshape((t1 - t0) * g, D)
        s = qq @ kt[kh, :, lo:hi]                                         # (tile*g, L)
        _softmax_masked(s, row_pos[j], sp[lo:hi], scale, window, softcap, f16,
                        row_sinks[kh][:len(s)] if len(sinks) else sinks)
        out[t0:t1, kh * g:(kh + 1) * g] = (s @ vv[kh][lo:hi]).reshape(t1 - t0, g, D)
    parallel_for(KVH * len(tiles), task)


def attend(q: np.ndarray, kt: np.ndarray, v: np.ndarray, slot_pos: np.ndarray, n_slots: int,
           q_pos: np.ndarray, scale: float, window: int = 0, softcap: float = 0.0,
           out: np.ndarray | None = None, f16: bool = False,
           sinks: np.ndarray | None = None, kernel: bool | None = None) -> np.ndarray:
    """softmax(q·kᵀ·scale + mask)·v for every query token and head.

    q (n, H, D) float32; keys transposed, kt (KVH, D, S); values v (S, KVH, D), both float32
    or both float16; H a multiple of KVH (grouped-query); only the first ``n_slots`` slots
    are read. A key at position sp is visible to a query at position p when
    0 <= sp <= p and, if ``window`` > 0, p - sp < window. A query that sees no key gets
    zeros. ``f16``: the attention weights are rounded to float16 before they meet v
    (llama.cpp's numerics; see ``_softmax_masked``).
    ``sinks`` (H,) float32: per head, a logit that joins each softmax without a value.
    ``kernel``: the Numba kernel (True) or BLAS products (False, float32 caches); None: the
    kernel for one query or a float16 cache.
    """
    if out is None:
        out = np.empty(q.shape, dtype=np.float32)
    n, H, D = q.shape
    if sinks is None:
        sinks = _NO_SINKS
    elif sinks.shape != (H,) or sinks.dtype != np.float32:
        raise ValueError(f"attention sinks: expected ({H},) float32, got {sinks.shape} {sinks.dtype}")
    if kt.dtype != v.dtype or kt.dtype not in (np.float32, np.float16):
        raise ValueError(f"attention cache: expected float32 or float16 keys and values, got "
                         f"{kt.dtype} and {v.dtype}")
    rest = (slot_pos, n_slots, q_pos, np.float32(scale), window, np.float32(softcap),
            bool(f16), np.ascontiguousarray(sinks), out)
    # One Numba kernel at any context length (a serial variant for short ones saved
    # microseconds a call but was one more kernel to compile on a first run).
    if kernel is None:
        kernel = n == 1 or kt.dtype == np.float16
    if kernel:   # a float16 cache as its bits (uint16), which ``load_f32`` converts
        if kt.dtype == np.float16:
            kt, v = kt.view(np.uint16), v.view(np.uint16)
        _attend_parallel(q, kt, v, *rest)
    elif kt.dtype == np.float32:
        _attend_blas(q, kt, v, *rest)
    else:
        raise ValueError("attention through BLAS needs a float32 cache")
    return out
