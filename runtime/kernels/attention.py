"""Scaled dot-product attention over a KV cache (causal, sliding-window, GQA).

The cache is a set of slots, each holding one position's key and value; ``slot_pos`` says which
position a slot holds (-1: empty). Masking by positions instead of by slot order lets the same
code serve a plain cache, a ring buffer for sliding-window layers and cache reuse across turns.

Decode (a few queries) runs a Numba kernel; prefill runs per-KV-head matrix products in BLAS.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._base import OPTS

# Below this many query tokens the Numba kernel beats setting up BLAS products.
BLAS_MIN_QUERIES = 16
# Below this much work (multiply-adds) a parallel region costs more than it saves.
_PARALLEL_MIN_WORK = 1048576


_NEG = np.float32(-1e30)  # masked score: finite, because fastmath assumes no infinities


@njit(**OPTS)
def _attend_heads(q, kt, v, slot_pos, n_slots, q_pos, scale, window, softcap, out, t, kh):
    # One query token, the g query heads sharing KV head kh. Keys are stored transposed,
    # kt (KVH, D, S), so each score update is a contiguous run over slots (vectorizes).
    H, D = q.shape[1], q.shape[2]
    g = H // kt.shape[0]
    p = q_pos[t]
    sc = np.zeros((g, n_slots), dtype=np.float32)           # (g, S) scores, then weights
    for hh in range(g):
        row = sc[hh]
        for d in range(D):
            qd = q[t, kh * g + hh, d] * scale
            krow = kt[kh, d]
            for s in range(n_slots):
                row[s] += qd * krow[s]
    any_seen = False
    for s in range(n_slots):
        sp = slot_pos[s]
        if sp < 0 or sp > p or (window > 0 and p - sp >= window):
            for hh in range(g):
                sc[hh, s] = _NEG
        else:
            any_seen = True
    acc = np.zeros((g, D), dtype=np.float32)                # (g, D) weighted values
    if any_seen:
        for hh in range(g):
            row = sc[hh]
            if softcap > 0.0:
                for s in range(n_slots):
                    if row[s] > _NEG:
                        row[s] = softcap * np.tanh(row[s] / softcap)
            m = row[0]
            for s in range(1, n_slots):
                m = max(m, row[s])
            total = np.float32(0.0)
            for s in range(n_slots):
                w = np.exp(row[s] - m) if row[s] > _NEG else np.float32(0.0)
                row[s] = w
                total += w
            inv = np.float32(1.0) / total
            for s in range(n_slots):
                row[s] *= inv
        for s in range(n_slots):
            vrow = v[s, kh]
            for hh in range(g):
                w = sc[hh, s]
                arow = acc[hh]
                for d in range(D):
                    arow[d] += w * vrow[d]
    for hh in range(g):
        for d in range(D):
            out[t, kh * g + hh, d] = acc[hh, d]


@njit(**OPTS)
def _attend_serial(q, kt, v, slot_pos, n_slots, q_pos, scale, window, softcap, out):
    for t in range(q.shape[0]):
        for kh in range(kt.shape[0]):
            _attend_heads(q, kt, v, slot_pos, n_slots, q_pos, scale, window, softcap, out, t, kh)


@njit(parallel=True, **OPTS)
def _attend_parallel(q, kt, v, slot_pos, n_slots, q_pos, scale, window, softcap, out):
    KVH = kt.shape[0]
    for idx in prange(q.shape[0] * KVH):
        t = idx // KVH
        _attend_heads(q, kt, v, slot_pos, n_slots, q_pos, scale, window, softcap, out, t,
                      idx - t * KVH)


def _attend_blas(q, kt, v, slot_pos, n_slots, q_pos, scale, window, softcap, out):
    n, H, D = q.shape
    KVH = kt.shape[0]
    g = H // KVH
    sp = slot_pos[:n_slots]
    visible = (sp[None, :] >= 0) & (sp[None, :] <= q_pos[:, None])      # (n, S)
    if window > 0:
        visible &= q_pos[:, None] - sp[None, :] < window
    for kh in range(KVH):
        vv = np.ascontiguousarray(v[:n_slots, kh])                        # (S, D)
        qq = q[:, kh * g:(kh + 1) * g].reshape(n * g, D)                  # (n*g, D)
        s = (qq @ kt[kh, :, :n_slots]).reshape(n, g, n_slots)             # (n, g, S)
        s *= np.float32(scale)
        if softcap > 0:
            s = np.float32(softcap) * np.tanh(s / np.float32(softcap))
        s = np.where(visible[:, None, :], s, np.float32(-np.inf))
        m = s.max(axis=2, keepdims=True)
        m[~np.isfinite(m)] = 0.0                                          # rows that see nothing
        e = np.exp(s - m)
        z = e.sum(axis=2, keepdims=True)
        z[z == 0] = 1.0
        out[:, kh * g:(kh + 1) * g] = ((e / z).reshape(n * g, n_slots) @ vv).reshape(n, g, D)


def attend(q: np.ndarray, kt: np.ndarray, v: np.ndarray, slot_pos: np.ndarray, n_slots: int,
           q_pos: np.ndarray, scale: float, window: int = 0, softcap: float = 0.0,
           out: np.ndarray | None = None) -> np.ndarray:
    """softmax(q·kᵀ·scale + mask)·v for every query token and head.

    q (n, H, D) float32; keys transposed, kt (KVH, D, S); values v (S, KVH, D); H a multiple
    of KVH (grouped-query); only the first ``n_slots`` slots are read. A key at position sp is visible to a query at
    position p when 0 <= sp <= p and, if ``window`` > 0, p - sp < window. A query that sees
    no key gets zeros.
    """
    if out is None:
        out = np.empty(q.shape, dtype=np.float32)
    n, H, D = q.shape
    args = (q, kt, v, slot_pos, n_slots, q_pos, np.float32(scale), window, np.float32(softcap),
            out)
    if n >= BLAS_MIN_QUERIES:
        _attend_blas(*args)
    elif n * H * n_slots * D < _PARALLEL_MIN_WORK or kt.shape[0] == 1:
        _attend_serial(*args)
    else:
        _attend_parallel(*args)
    return out
