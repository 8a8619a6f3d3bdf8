"""Blocks for bidirectional encoders (BERT family) that are numpy on every backend:
attention with a padding mask, pooling and L2 normalisation. The rest comes from the model's
ops (``pocketlm.nn.ops``: ``weight``, ``linear``, ``layer_norm``, ``gelu``, ``softmax``).
"""
from __future__ import annotations

import numpy as np

F = np.float32
_NEG = F(-1e30)   # masked score: finite, because the Numba softmax assumes no infinities


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, lengths: np.ndarray, scale: float,
              softmax) -> np.ndarray:
    """Bidirectional attention of padded sequences: q, k, v (B, T, H, D); keys at positions
    >= lengths[b] are masked. Returns (B*T, H*D); rows of padding positions are junk."""
    B, T, H, D = q.shape
    s = np.matmul(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 3, 1))        # (B, H, T, T)
    s *= F(scale)
    pad = np.arange(T)[None, :] >= np.asarray(lengths)[:, None]             # (B, T) keys
    if pad.any():
        s = np.where(pad[:, None, None, :], _NEG, s)
    p = softmax(s.reshape(B * H * T, T)).reshape(B, H, T, T)
    o = np.matmul(p, v.transpose(0, 2, 1, 3))                               # (B, H, T, D)
    return np.ascontiguousarray(o.transpose(0, 2, 1, 3)).reshape(B * T, H * D)


POOLING = {0: "none", 1: "mean", 2: "cls", 3: "last"}   # llama_pooling_type


def pool(h: np.ndarray, lengths: np.ndarray, mode: str) -> np.ndarray:
    """One vector per sequence from hidden states h (B, T, d): "mean" over the first
    lengths[b] positions (special tokens included), "cls" (position 0) or "last"."""
    B, T, _ = h.shape
    lengths = np.asarray(lengths)
    if mode == "mean":
        valid = (np.arange(T)[None, :] < lengths[:, None]).astype(F)          # (B, T)
        return np.einsum("bt,btd->bd", valid, h) / lengths[:, None].astype(F)
    if mode == "cls":
        return h[:, 0].copy()
    if mode == "last":
        return h[np.arange(B), lengths - 1].copy()
    raise ValueError(f"pooling {mode!r} is not supported (mean, cls or last)")


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of x scaled to unit L2 norm (norms below eps divide by eps, as torch's normalize)."""
    n = np.sqrt(np.einsum("ij,ij->i", x.astype(np.float64), x.astype(np.float64)))
    return (x / np.maximum(n, eps)[:, None]).astype(F)
