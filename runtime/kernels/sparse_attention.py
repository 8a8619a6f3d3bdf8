"""InfLLM v2 block-sparse attention (MiniCPM4): each query attends to a few 64-token blocks.

Per layer and KV head the cache keeps compressed keys: ``C[j]`` is the mean of the post-RoPE
keys at positions ``[j*stride, j*stride + kernel)`` (complete windows only). For a query at
position p, each query head g of a KV group scores the visible kernels (those ending at or
before p) with ``softmax_j(q_g·C[j]·scale)``; the group sums the heads' scores, max-pools them
to blocks (block b takes the kernels overlapping its tokens ``[b*B, b*B+B)``), forces the first
``init_blocks`` blocks and the ``window/B`` blocks behind the query's own block, and keeps the
``topk`` best blocks (forced ones included). The heads then run exact softmax attention over the
tokens of the kept blocks, causally. A query below the switch length (``p + 1 < dense_len``),
or one whose blocks all fit in ``topk``, attends densely, so the kernel is exact there.

The score softmax is exact (the LSE approximation with a second, coarser kernel set that some
CUDA kernels use is not implemented). Selection is per KV head and per query token.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ._base import OPTS

# Below this much work (multiply-adds) a parallel region costs more than it saves.
_PARALLEL_MIN_WORK = 131072

_BIG = np.float32(1e30)   # finite stand-ins for ±inf: fastmath assumes no infinities


@dataclass(frozen=True)
class SparseConfig:
    """InfLLM v2 parameters; the defaults are MiniCPM4's published ``sparse_config``."""
    kernel_size: int = 32
    kernel_stride: int = 16
    block_size: int = 64
    init_blocks: int = 1
    window_size: int = 2048
    topk: int = 64
    dense_len: int = 8192   # dense attention while the sequence is shorter; 0: always sparse

    def __post_init__(self):
        for name in ("kernel_size", "kernel_stride", "block_size", "topk"):
            if getattr(self, name) <= 0:
                raise ValueError(f"sparse attention {name} must be positive")
        if self.block_size % self.kernel_stride or self.window_size % self.block_size:
            raise ValueError("sparse attention needs block_size a multiple of kernel_stride "
                             "and window_size a multiple of block_size")
        if self.init_blocks < 0 or self.window_size < 0:
            raise ValueError("sparse attention init_blocks and window_size must be >= 0")


class CompressedKeys:
    """The compressed-key cache of one layer, filled lazily from the layer's keys.

    Kernels are derived from the cached keys on demand, so a model can run dense steps and
    switch to sparse ones later, and a cache that is truncated and rewritten (prefix reuse)
    recomputes exactly the kernels that covered rewritten positions.
    """

    def __init__(self, n_kv_heads: int, head_dim: int, n_ctx: int, cfg: SparseConfig):
        self.cfg = cfg
        n_max = max(0, (n_ctx - cfg.kernel_size) // cfg.kernel_stride + 1)
        # transposed like the key cache, so scoring runs over contiguous kernels
        self.c = np.zeros((n_kv_heads, head_dim, n_max), np.float32)  # (KVH, D, NC)
        self.n = 0   # kernels [0, n) are valid

    def _count(self, n_tokens: int) -> int:
        """Complete kernels within the first n_tokens positions."""
        p, s = self.cfg.kernel_size, self.cfg.kernel_stride
        return 0 if n_tokens < p else (n_tokens - p) // s + 1

    def update(self, kt: np.ndarray, first: int, last: int):
        """Positions [first, last] were just written to kt (KVH, D, S), slot = position."""
        self.n = min(self.n, self._count(first))
        want = min(self._count(last + 1), self.c.shape[2])
        if want > self.n:
            _compress(kt, self.n, want, self.cfg.kernel_size, self.cfg.kernel_stride, self.c)
            self.n = want


@njit(**OPTS)
def _compress(kt, j0, j1, p, s, c):
    # serial: a decode step adds one kernel at most; switching to sparse adds T/16 once
    KVH, D = kt.shape[0], kt.shape[1]
    inv = np.float32(1.0) / np.float32(p)
    for kh in range(KVH):
        for d in range(D):
            row = kt[kh, d]
            for j in range(j0, j1):
                acc = np.float32(0.0)
                for t in range(j * s, j * s + p):
                    acc += row[t]
                c[kh, d, j] = acc * inv


@njit(**OPTS)
def _select(q, c, n_c, p, kh, scale, ks, kst, B, init_blocks, local_blocks, topk, dense_len,
            sel):
    """Blocks attended by the query at position p for KV head kh, ascending, into sel;
    returns their count."""
    H, D = q.shape[0], q.shape[1]
    g = H // c.shape[0]
    q_blk = p // B
    nb = q_blk + 1
    if p + 1 < dense_len or nb <= topk:
        for b in range(nb):
            sel[b] = b
        return nb
    nv = 0 if p + 1 < ks else min(n_c, (p + 1 - ks) // kst + 1)   # kernels ending <= p
    S = np.zeros(max(nv, 1), np.float32)                           # (nv,) group scores
    sc = np.empty(max(nv, 1), np.float32)                          # (nv,) one head's scores
    for hh in range(g):
        sc[:] = 0.0
        for d in range(D):
            qd = q[kh * g + hh, d] * scale
            crow = c[kh, d]
            for j in range(nv):
                sc[j] += qd * crow[j]
        m = -_BIG
        for j in range(nv):
            m = max(m, sc[j])
        total = np.float32(0.0)
        for j in range(nv):
            sc[j] = np.exp(sc[j] - m)
            total += sc[j]
        if nv > 0:
            inv = np.float32(1.0) / total
            for j in range(nv):
                S[j] += sc[j] * inv
    per = B // kst
    score = np.empty(nb, np.float32)                                # (nb,) block scores
    for b in range(nb):
        if b < init_blocks or b >= q_blk - local_blocks:
            score[b] = _BIG
        else:
            best = -_BIG
            for j in range(max(0, b * per - 1), min(nv, b * per + per)):
                best = max(best, S[j])
            score[b] = best
    order = np.argsort(-score)
    k = min(topk, nb)
    for i in range(k):
        sel[i] = order[i]
    sel[:k].sort()
    return k


@njit(**OPTS)
def _attend_one(q, kt, v, slot_pos, n_slots, c, n_c, q_pos, scale, cfg, out, t, kh):
    ks, kst, B, init_blocks, local_blocks, topk, dense_len = cfg
    H, D = q.shape[1], q.shape[2]
    g = H // kt.shape[0]
    p = q_pos[t]
    sel = np.empty(p // B + 1, np.int64)
    k = _select(q[t], c, n_c, p, kh, scale, ks, kst, B, init_blocks, local_blocks, topk,
                dense_len, sel)
    start = np.empty(k + 1, np.int64)       # (k+1,) offsets of the kept blocks' runs
    start[0] = 0
    for i in range(k):
        s0 = sel[i] * B
        start[i + 1] = start[i] + max(0, min(s0 + B, n_slots) - s0)
    n_tok = start[k]
    sc = np.zeros((g, n_tok), np.float32)                          # (g, T) scores, weights
    # each kept block is a contiguous run of slots, so these loops vectorize like dense ones
    for hh in range(g):
        row = sc[hh]
        for d in range(D):
            qd = q[t, kh * g + hh, d] * scale
            krow = kt[kh, d]
            for i in range(k):
                # views with loop indices from range(): no wraparound checks, so SIMD
                kb = krow[sel[i] * B:]
                rb = row[start[i]:start[i + 1]]
                for j in range(rb.shape[0]):
                    rb[j] += qd * kb[j]
    seen = False
    for i in range(k):
        s0, o = sel[i] * B, start[i]
        for j in range(start[i + 1] - o):
            sp = slot_pos[s0 + j]
            if sp < 0 or sp > p:
                for hh in range(g):
                    sc[hh, o + j] = -_BIG
            else:
                seen = True
    acc = np.zeros((g, D), np.float32)                             # (g, D) weighted values
    if seen:
        for hh in range(g):
            row = sc[hh]
            m = -_BIG
            for i in range(n_tok):
                m = max(m, row[i])
            total = np.float32(0.0)
            for i in range(n_tok):
                w = np.exp(row[i] - m) if row[i] > -_BIG else np.float32(0.0)
                row[i] = w
                total += w
            inv = np.float32(1.0) / total
            for i in range(n_tok):
                row[i] *= inv
        for i in range(k):
            s0, o = sel[i] * B, start[i]
            for j in range(start[i + 1] - o):
                vrow = v[s0 + j, kh]
                for hh in range(g):
                    w = sc[hh, o + j]
                    arow = acc[hh]
                    for d in range(D):
                        arow[d] += w * vrow[d]
    for hh in range(g):
        for d in range(D):
            out[t, kh * g + hh, d] = acc[hh, d]


@njit(parallel=True, **OPTS)
def _attend_parallel(q, kt, v, slot_pos, n_slots, c, n_c, q_pos, scale, cfg, out):
    KVH = kt.shape[0]
    for idx in prange(q.shape[0] * KVH):
        t = idx // KVH
        _attend_one(q, kt, v, slot_pos, n_slots, c, n_c, q_pos, scale, cfg, out, t,
                    idx - t * KVH)


@njit(**OPTS)
def _attend_serial(q, kt, v, slot_pos, n_slots, c, n_c, q_pos, scale, cfg, out):
    for t in range(q.shape[0]):
        for kh in range(kt.shape[0]):
            _attend_one(q, kt, v, slot_pos, n_slots, c, n_c, q_pos, scale, cfg, out, t, kh)


@njit(parallel=True, **OPTS)
def _select_all(q, c, n_c, q_pos, scale, cfg, sel, counts):
    ks, kst, B, init_blocks, local_blocks, topk, dense_len = cfg
    KVH = c.shape[0]
    for idx in prange(q.shape[0] * KVH):
        t = idx // KVH
        kh = idx - t * KVH
        buf = np.empty(q_pos[t] // B + 1, np.int64)
        k = _select(q[t], c, n_c, q_pos[t], kh, scale, ks, kst, B, init_blocks,
                    local_blocks, topk, dense_len, buf)
        counts[t, kh] = k
        sel[t, kh, :k] = buf[:k]


def _cfg_tuple(cfg: SparseConfig):
    return (np.int64(cfg.kernel_size), np.int64(cfg.kernel_stride), np.int64(cfg.block_size),
            np.int64(cfg.init_blocks), np.int64(cfg.window_size // cfg.block_size),
            np.int64(cfg.topk), np.int64(cfg.dense_len))


def select_blocks(q: np.ndarray, keys: CompressedKeys, q_pos: np.ndarray, scale: float
                  ) -> list[list[np.ndarray]]:
    """The blocks each query token attends to, per KV head: ``[t][kh]`` ascending block ids.

    q (n, H, D) post-RoPE queries; ``keys`` must be up to date for the positions in q_pos.
    """
    q_pos = np.asarray(q_pos, np.int64)
    n, KVH = q.shape[0], keys.c.shape[0]
    width = int(q_pos.max()) // keys.cfg.block_size + 1
    sel = np.full((n, KVH, width), -1, np.int64)
    counts = np.zeros((n, KVH), np.int64)
    _select_all(np.ascontiguousarray(q, np.float32), keys.c, keys.n, q_pos, np.float32(scale),
                _cfg_tuple(keys.cfg), sel, counts)
    return [[sel[t, kh, :counts[t, kh]] for kh in range(KVH)] for t in range(n)]


def attend_sparse(q: np.ndarray, kt: np.ndarray, v: np.ndarray, slot_pos: np.ndarray,
                  n_slots: int, q_pos: np.ndarray, scale: float, keys: CompressedKeys,
                  out: np.ndarray | None = None) -> np.ndarray:
    """Block-sparse attention for q (n, H, D) over a global (slot = position) cache: keys
    transposed kt (KVH, D, S), values v (S, KVH, D). ``keys`` must already cover the cache
    (``CompressedKeys.update``). Returns (n, H, D)."""
    if out is None:
        out = np.empty(q.shape, np.float32)
    n, H, D = q.shape
    span = min(n_slots, keys.cfg.topk * keys.cfg.block_size)    # tokens a query reads, at most
    serial = n * H * span * D < _PARALLEL_MIN_WORK or n * kt.shape[0] == 1
    (_attend_serial if serial else _attend_parallel)(
        q, kt, v, slot_pos, n_slots, keys.c, keys.n, np.asarray(q_pos, np.int64),
        np.float32(scale), _cfg_tuple(keys.cfg), out)
    return out
