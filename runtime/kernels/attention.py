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
_PARALLEL_MIN_WORK = 1 << 20


def _attend_body(q, k, v, slot_pos, n_slots, q_pos, scale, window, softcap, out, t, h):
    # Visibility is tracked with flags, not -inf: fastmath assumes no infinities.
    H = q.shape[1]
    D = q.shape[2]
    kh = h // (H // k.shape[1])
    p = q_pos[t]
    scores = np.empty(n_slots, dtype=np.float32)   # (S,) scores of visible slots
    seen = np.zeros(n_slots, dtype=np.bool_)       # (S,) slot visible to this query
    m = np.float32(0.0)
    any_seen = False
    for s in range(n_slots):
        sp = slot_pos[s]
        if sp < 0 or sp > p or (window > 0 and p - sp >= window):
            continue
        acc = np.float32(0.0)
        for d in range(D):
            acc += q[t, h, d] * k[s, kh, d]
        acc *= scale
        if softcap > 0.0:
            acc = softcap * np.tanh(acc / softcap)
        scores[s] = acc
        seen[s] = True
        if not any_seen or acc > m:
            m = acc
        any_seen = True
    acc_v = np.zeros(D, dtype=np.float32)            # (D,) weighted sum of values
    if any_seen:
        total = np.float32(0.0)
        for s in range(n_slots):
            if not seen[s]:
                continue
            w = np.exp(scores[s] - m)
            total += w
            for d in range(D):
                acc_v[d] += w * v[s, kh, d]
        acc_v /= total
    for d in range(D):
        out[t, h, d] = acc_v[d]


_body = njit(inline="always", **OPTS)(_attend_body)


@njit(**OPTS)
def _attend_serial(q, k, v, slot_pos, n_slots, q_pos, scale, window, softcap, out):
    n, H, _ = q.shape
    for t in range(n):
        for h in range(H):
            _body(q, k, v, slot_pos, n_slots, q_pos, scale, window, softcap, out, t, h)


@njit(parallel=True, **OPTS)
def _attend_parallel(q, k, v, slot_pos, n_slots, q_pos, scale, window, softcap, out):
    n, H, _ = q.shape
    for idx in prange(n * H):
        t = idx // H
        _body(q, k, v, slot_pos, n_slots, q_pos, scale, window, softcap, out, t, idx - t * H)


def _attend_blas(q, k, v, slot_pos, n_slots, q_pos, scale, window, softcap, out):
    n, H, D = q.shape
    KVH = k.shape[1]
    g = H // KVH
    sp = slot_pos[:n_slots]
    visible = (sp[None, :] >= 0) & (sp[None, :] <= q_pos[:, None])      # (n, S)
    if window > 0:
        visible &= q_pos[:, None] - sp[None, :] < window
    for kh in range(KVH):
        kk = np.ascontiguousarray(k[:n_slots, kh])                        # (S, D)
        vv = np.ascontiguousarray(v[:n_slots, kh])                        # (S, D)
        qq = q[:, kh * g:(kh + 1) * g].reshape(n * g, D)                  # (n*g, D)
        s = (qq @ kk.T).reshape(n, g, n_slots)                            # (n, g, S)
        s *= np.float32(scale)
        if softcap > 0:
            s = np.float32(softcap) * np.tanh(s / np.float32(softcap))
        s = np.where(visible[:, None, :], s, np.float32(-np.inf))
        m = s.max(axis=2, keepdims=True)
        m[~np.isfinite(m)] = 0.0                                          # rows that see nothing
        e = np.exp(s - m)
        z = e.sum(axis=2, keepdims=True)
        z[z == 0] = 1.0
        out[:, kh * g:(kh + 1) * g] = (e / z).reshape(n * g, n_slots).__matmul__(vv).reshape(
            n, g, D)


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, slot_pos: np.ndarray, n_slots: int,
           q_pos: np.ndarray, scale: float, window: int = 0, softcap: float = 0.0,
           out: np.ndarray | None = None) -> np.ndarray:
    """softmax(q·kᵀ·scale + mask)·v for every query token and head.

    q (n, H, D) float32; k, v (S, KVH, D) float32 with H a multiple of KVH (grouped-query);
    only the first ``n_slots`` slots are read. A key at position sp is visible to a query at
    position p when 0 <= sp <= p and, if ``window`` > 0, p - sp < window. A query that sees
    no key gets zeros.
    """
    if out is None:
        out = np.empty(q.shape, dtype=np.float32)
    n, H, D = q.shape
    args = (q, k, v, slot_pos, n_slots, q_pos, np.float32(scale), window, np.float32(softcap),
            out)
    if n >= BLAS_MIN_QUERIES:
        _attend_blas(*args)
    elif n * H * n_slots * D < _PARALLEL_MIN_WORK:
        _attend_serial(*args)
    else:
        _attend_parallel(*args)
    return out
