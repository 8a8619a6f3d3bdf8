"""F32 / F16 / BF16 weight products. As ggml's x86 path: F16 and BF16 weights meet activations
rounded to the same type, both widened to f32, multiplied and summed in f32."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._base import OPTS, U, bf2f, round_bf16, round_f16, u16f

F = np.float32
PAR = dict(parallel=True, **OPTS)


@njit(**PAR)
def mm_f32(w2, x, out):
    rows, (n, cols) = w2.shape[0], x.shape
    w = w2.reshape(-1).view(np.float32)
    for r in prange(rows):
        base = U(r) * U(cols)
        for t in range(n):
            acc = F(0)
            for i in range(cols):
                acc += w[base + U(i)] * x[t, i]
            out[t, r] = acc


@njit(**PAR)
def mm_f16(w2, x, out):
    rows, (n, cols) = w2.shape[0], x.shape
    w = w2.reshape(-1).view(np.uint16)
    xr = np.empty((n, cols), np.float32)   # activations rounded to f16
    for t in range(n):
        for i in range(cols):
            xr[t, i] = round_f16(x[t, i])
    for r in prange(rows):
        base = U(r) * U(cols)
        for t in range(n):
            acc = F(0)
            for i in range(cols):
                acc += u16f(w[base + U(i)]) * xr[t, i]
            out[t, r] = acc


@njit(**PAR)
def mm_bf16(w2, x, out):
    rows, (n, cols) = w2.shape[0], x.shape
    w = w2.reshape(-1).view(np.uint16)
    xr = np.empty((n, cols), np.float32)   # activations rounded to bf16
    for t in range(n):
        for i in range(cols):
            xr[t, i] = round_bf16(x[t, i])
    for r in prange(rows):
        base = U(r) * U(cols)
        for t in range(n):
            acc = F(0)
            for i in range(cols):
                acc += bf2f(w[base + U(i)]) * xr[t, i]
            out[t, r] = acc


@njit(**PAR)
def deq_f32(w2, r0, r1, dst):
    cols = dst.shape[1]
    for r in prange(r1 - r0):
        row = w2[r0 + r].view(np.float32)
        for i in range(cols):
            dst[r, i] = row[i]


@njit(**PAR)
def deq_f16(w2, r0, r1, dst):
    cols = dst.shape[1]
    for r in prange(r1 - r0):
        row = w2[r0 + r].view(np.uint16)
        for i in range(cols):
            dst[r, i] = u16f(row[i])


@njit(**PAR)
def deq_bf16(w2, r0, r1, dst):
    cols = dst.shape[1]
    for r in prange(r1 - r0):
        row = w2[r0 + r].view(np.uint16)
        for i in range(cols):
            dst[r, i] = bf2f(row[i])
