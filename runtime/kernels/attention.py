"""Scaled dot-product attention over a KV cache (causal, sliding-window, GQA), in Numba.

The cache is a set of slots, each holding one position's key and value; ``slot_pos`` says which
position a slot holds (-1: empty). Masking by positions instead of by slot order lets the same
kernel serve a plain cache, a ring buffer for sliding-window layers and cache reuse across turns.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(nogil=True, cache=True, fastmath=True, parallel=True)
def _attend(q, k, v, slot_pos, n_slots, q_pos, scale, window, softcap, out):
    # q: (n, H, D)  k, v: (S, KVH, D)  slot_pos: (S,)  q_pos: (n,)  out: (n, H, D)
    n, H, D = q.shape
    KVH = k.shape[1]
    group = H // KVH
    for idx in prange(n * H):
        t = idx // H
        h = idx - t * H
        kh = h // group
        p = q_pos[t]
        scores = np.empty(n_slots, dtype=np.float32)
        m = -np.inf
        for s in range(n_slots):
            sp = slot_pos[s]
            if sp < 0 or sp > p or (window > 0 and p - sp >= window):
                scores[s] = -np.inf
                continue
            acc = np.float32(0.0)
            for d in range(D):
                acc += q[t, h, d] * k[s, kh, d]
            acc *= scale
            if softcap > 0.0:
                acc = softcap * np.tanh(acc / softcap)
            scores[s] = acc
            if acc > m:
                m = acc
        for d in range(D):
            out[t, h, d] = 0.0
        if m == -np.inf:
            continue
        total = np.float32(0.0)
        for s in range(n_slots):
            if scores[s] == -np.inf:
                continue
            w = np.exp(scores[s] - m)
            total += w
            for d in range(D):
                out[t, h, d] += w * v[s, kh, d]
        inv = np.float32(1.0) / total
        for d in range(D):
            out[t, h, d] *= inv


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, slot_pos: np.ndarray, n_slots: int,
           q_pos: np.ndarray, scale: float, window: int = 0, softcap: float = 0.0,
           out: np.ndarray | None = None) -> np.ndarray:
    """softmax(q·kᵀ·scale + mask)·v for every query token and head.

    q (n, H, D) float32; k, v (S, KVH, D) float32 with H a multiple of KVH (grouped-query);
    only the first ``n_slots`` slots are read. A key at position sp is visible to a query at
    position p when 0 <= sp <= p and, if ``window`` > 0, p - sp < window.
    """
    if out is None:
        out = np.empty(q.shape, dtype=np.float32)
    _attend(q, k, v, slot_pos, n_slots, q_pos, np.float32(scale), window, np.float32(softcap),
            out)
    return out
