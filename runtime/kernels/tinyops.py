"""Ops for tiny encoders, twice: Numba kernels and plain numpy (no JIT at all).

- causal depthwise convolution (Conv1d with groups = channels, left padding K-1) + SiLU;
- W8A8 linear: int8 weights with one scale per output row, activations quantized per token
  (row absmax -> int8) at call time, integer dot products, int32 accumulate.

The numpy twins (also of GELU, RMSNorm and softmax) serve ``pocketlm.nn.ops.NumpyOps``, the
fallback where compiling is not possible, and are the references the kernel tests check.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ._base import OPTS

F = np.float32
SER = dict(OPTS)   # serial: these models are a few hundred KB, smaller than a thread fork costs


# ------------------------------------------------------------------------- Numba kernels
@njit(**SER)
def dwconv_silu_rows(x, wt, b, n_out, out):
    """x (T, d); wt (K, d*fe) taps-major; b (d*fe,); out (>= n_out, d*fe): rows 0..n_out-1 of
    silu(b + sum_k wt[k, ch] * x[j-K+1+k, ch // fe]), x taken as 0 before row 0.
    Channels innermost: contiguous rows of x and wt, so the loop vectorizes."""
    T, d = x.shape
    K, C = wt.shape
    fe = C // d
    acc = np.empty(C, np.float32)   # (C,) one output row
    for j in range(n_out):
        acc[:] = b
        for k in range(max(0, K - 1 - j), K):   # taps before row 0 read zeros: skipped
            xr = x[j - K + 1 + k]
            wr = wt[k]
            if fe == 1:
                for ch in range(C):
                    acc[ch] += wr[ch] * xr[ch]
            else:
                for ch in range(C):
                    acc[ch] += wr[ch] * xr[ch // fe]
        for ch in range(C):
            out[j, ch] = acc[ch] / (F(1.0) + np.exp(-acc[ch]))


@njit(**SER)
def linear_i8_rows(x, wq, ws, b, out):
    """x (n, k) f32; wq (rows, k) int8; ws (rows,) f32 row scales; b (rows,) f32; out (n, rows).

    Each token row of x is quantized to int8 with its own absmax scale, dotted with the int8
    weight rows in int32, then scaled back: out = acc * (absmax/127) * ws + b."""
    n, k = x.shape
    rows = wq.shape[0]
    xq = np.empty(k, np.int32)   # (k,) this token's int8 values, widened once
    for t in range(n):
        amax = F(0.0)
        for i in range(k):
            a = abs(x[t, i])
            if a > amax:
                amax = a
        inv = F(127.0) / amax if amax > 0 else F(0.0)
        for i in range(k):
            xq[i] = np.int32(np.rint(x[t, i] * inv))
        sx = amax / F(127.0)
        for r in range(rows):
            acc = np.int32(0)
            for i in range(k):
                acc += xq[i] * np.int32(wq[r, i])
            out[t, r] = F(acc) * sx * ws[r] + b[r]


# ------------------------------------------------------------------------- numpy twins
def quantize_rows_i8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric int8: x (n, k) -> (values as int-valued f32 (n, k), absmax/127 (n,))."""
    x = np.asarray(x, F)
    amax = np.abs(x).max(axis=1)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, F(127.0) / amax, F(0.0)).astype(F)
    return np.rint(x * inv[:, None]), (amax / F(127.0)).astype(F)


def np_linear_i8(x, wq, ws, b, out=None):
    """numpy twin of ``linear_i8_rows``. The int8 products are summed in f32, which is exact:
    every partial sum is an integer below 2**24 while k * 127 * 127 < 2**24 (k <= 1040)."""
    xq, sx = quantize_rows_i8(x)
    acc = xq @ np.asarray(wq, F).T                        # (n, rows) exact integers
    res = (acc * sx[:, None] * ws[None, :] + b[None, :]).astype(F)
    if out is None:
        return res
    out[...] = res
    return out


def np_dwconv_silu(x, wt, b, n_out, out=None):
    """numpy twin of ``dwconv_silu_rows``."""
    T, d = x.shape
    K, C = wt.shape
    xs = np.repeat(x[:n_out], C // d, axis=1) if C != d else x[:n_out]   # (n_out, C)
    pad = np.concatenate([np.zeros((K - 1, C), F), xs])                 # (K-1+n_out, C)
    win = np.lib.stride_tricks.sliding_window_view(pad, K, axis=0)      # (n_out, C, K)
    c = np.einsum("jck,kc->jc", win, wt, dtype=F) + b
    res = (c / (F(1.0) + np.exp(-c))).astype(F)
    if out is None:
        return res
    out[:n_out] = res
    return out


# Abramowitz & Stegun 7.1.26: 1 - erf(z) = t*poly(t) * exp(-z^2), t = 1/(1 + p*z), z >= 0,
# |error| < 1.5e-7 (numpy has no erf)
_AS_P = F(0.3275911)
_AS_A = tuple(F(a) for a in (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592))


def np_gelu(x: np.ndarray) -> np.ndarray:
    """0.5 * x * (1 + erf(x / sqrt(2))) in float32, in place on temporaries."""
    z = np.abs(x) * F(0.7071067811865476)
    t = z * _AS_P
    t += F(1)
    np.reciprocal(t, out=t)
    poly = t * _AS_A[0]
    for a in _AS_A[1:]:
        poly += a
        poly *= t
    np.square(z, out=z)
    np.negative(z, out=z)
    np.exp(z, out=z)
    poly *= z                     # 1 - erf(|x|/sqrt(2))
    poly *= F(0.5)
    # x >= 0: x * (1 - poly/2); x < 0: x * poly/2
    return x * np.where(x >= 0, F(1) - poly, poly)


def np_rms_norm(x, w, eps, out=None):
    """numpy twin of ``kernels.rms_norm`` (sum of squares in f64, scale in f32)."""
    ms = (x.astype(np.float64) ** 2).mean(axis=-1, keepdims=True).astype(F)
    res = (x * (F(1.0) / np.sqrt(ms + F(eps))) * w).astype(F)
    if out is None:
        return res
    out[...] = res
    return out


def np_softmax(x, out=None):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    res = (e / e.sum(axis=-1, keepdims=True)).astype(F)
    if out is None:
        return res
    out[...] = res
    return out
