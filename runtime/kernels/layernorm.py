"""LayerNorm and exact (erf) GELU rows for encoders; ggml_norm's numerics (mean and variance
summed in f64, scale in f32)."""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._base import OPTS

F = np.float32
# Parallel over rows: an encoder batch is thousands of rows, each a few hundred values.
PAR = dict(parallel=True, **OPTS)


@njit(**PAR)
def layer_norm_rows(x, w, b, eps, out):
    """x, out (n, d); w, b (d,): (x - mean) / sqrt(var + eps) * w + b per row."""
    n, d = x.shape
    for t in prange(n):
        s = 0.0
        for i in range(d):
            s += np.float64(x[t, i])
        mean = F(s / d)
        v = 0.0
        for i in range(d):
            c = np.float64(x[t, i] - mean)
            v += c * c
        scale = F(1.0) / np.sqrt(F(v / d) + eps)
        for i in range(d):
            out[t, i] = (x[t, i] - mean) * scale * w[i] + b[i]


@njit(**PAR)
def gelu_erf_rows(x, out):
    """x, out (n, d): 0.5 * x * (1 + erf(x / sqrt(2))) (BERT's exact GELU), f32 erf."""
    n, d = x.shape
    for t in prange(n):
        for i in range(d):
            v = x[t, i]
            out[t, i] = F(0.5) * v * (F(1) + math.erf(v * F(0.7071067811865476)))


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float,
               out: np.ndarray | None = None) -> np.ndarray:
    """LayerNorm over the last axis of x (..., d) f32 with weight and bias (d,)."""
    x2 = np.ascontiguousarray(x, F).reshape(-1, x.shape[-1])
    if out is None:
        out = np.empty(x.shape, F)
    layer_norm_rows(x2, w, b, F(eps), out.reshape(x2.shape))
    return out


def gelu_erf(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Exact GELU of x (..., d) f32."""
    x2 = np.ascontiguousarray(x, F).reshape(-1, x.shape[-1])
    if out is None:
        out = np.empty(x.shape, F)
    gelu_erf_rows(x2, out.reshape(x2.shape))
    return out
