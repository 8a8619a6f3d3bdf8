"""Element-wise and row kernels: rms_norm, rope, softmax, gated activations (ggml semantics)."""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._base import VEC_OPTS, exp_f32, silu_f32

F = np.float32
# Serial on purpose: these ops touch a few KB per token, less than a parallel region costs.
SER = dict(VEC_OPTS)
SQRT_2_OVER_PI = F(0.7978845608028654)
GELU_COEF_A = F(0.044715)


@njit(**SER)
def rms_norm_rows(x, w, eps, out):
    """x, out (n, d); w (d,). Sum of squares in f64 as ggml."""
    n, d = x.shape
    for t in range(n):
        s = 0.0
        for i in range(d):
            s += np.float64(x[t, i]) * np.float64(x[t, i])
        scale = F(1.0) / np.sqrt(F(s / d) + eps)
        for i in range(d):
            out[t, i] = x[t, i] * scale * w[i]


@njit(**SER)
def rope_rows(x, pos, n_dims, base, freq_scale, neox, ff, ext_factor, corr0, corr1, mscale,
              out):
    """x, out (n_tokens, n_heads, head_dim); pos (n_tokens,) int; ff (n_dims/2,) frequency
    factors or empty. Angles as ggml's rope cache and rope_yarn, all in f32: theta_0 = pos,
    theta_{i+1} = theta_i * base**(-2/n_dims); pair i turns by freq_scale * theta_i / ff[i],
    or with YaRN (ext_factor != 0) by a ramp between that and theta_i / ff[i] over the pairs
    corr0..corr1, and cos/sin are scaled by mscale (times 1 + 0.1 ln(1/freq_scale) with
    YaRN)."""
    nt, nh, hd = x.shape
    half = n_dims // 2
    theta_scale = F(base ** (-2.0 / n_dims))
    has_ff = ff.shape[0] > 0
    fs = F(freq_scale)
    m = F(mscale)
    if ext_factor != 0.0:
        m *= F(1) + F(0.1) * F(math.log(F(1) / fs))
    for t in range(nt):
        cs = np.empty(half, np.float32)   # (n_dims/2,) cos per pair
        sn = np.empty(half, np.float32)   # (n_dims/2,) sin per pair
        theta = F(pos[t])
        for i in range(half):
            extrap = theta / ff[i] if has_ff else theta
            th = fs * extrap
            if ext_factor != 0.0:
                y = (F(i) - F(corr0)) / max(F(0.001), F(corr1) - F(corr0))
                ramp = (F(1) - min(F(1), max(F(0), y))) * F(ext_factor)
                th = th * (F(1) - ramp) + extrap * ramp
            cs[i] = F(math.cos(th)) * m
            sn[i] = F(math.sin(th)) * m
            theta *= theta_scale
        for h in range(nh):
            for i in range(half):
                if neox:
                    a, b = i, i + half
                else:
                    a, b = 2 * i, 2 * i + 1
                x0 = x[t, h, a]
                x1 = x[t, h, b]
                out[t, h, a] = x0 * cs[i] - x1 * sn[i]
                out[t, h, b] = x0 * sn[i] + x1 * cs[i]
            for i in range(n_dims, hd):
                out[t, h, i] = x[t, h, i]


@njit(**SER)
def softmax_rows(x, out):
    n, d = x.shape
    for t in range(n):
        m = x[t, 0]
        for i in range(1, d):
            m = max(m, x[t, i])
        s = F(0)
        for i in range(d):
            e = exp_f32(x[t, i] - m)
            out[t, i] = e
            s += e
        inv = F(1) / s
        for i in range(d):
            out[t, i] *= inv


@njit(**SER)
def silu_mul_flat(g, u, out):
    for i in range(g.shape[0]):
        out[i] = silu_f32(g[i]) * u[i]


@njit(**SER)
def gelu_tanh_mul_flat(g, u, out):
    # 0.5 * (1 + tanh(y)) written as the sigmoid 1 / (1 + exp(-2y)): no cancellation where
    # tanh(y) is near -1.
    for i in range(g.shape[0]):
        v = g[i]
        y = SQRT_2_OVER_PI * v * (F(1) + GELU_COEF_A * v * v)
        out[i] = v / (F(1) + exp_f32(F(-2) * y)) * u[i]


# gpt-oss's clamped SwiGLU (ggml_swiglu_oai with llama.cpp's constants)
OAI_ALPHA = F(1.702)
OAI_LIMIT = F(7.0)


@njit(**SER)
def swiglu_oai_mul_flat(g, u, out):
    for i in range(g.shape[0]):
        x = min(g[i], OAI_LIMIT)
        y = min(max(u[i], -OAI_LIMIT), OAI_LIMIT)
        out[i] = x / (F(1) + exp_f32(OAI_ALPHA * -x)) * (y + F(1))


@njit(**SER)
def relu_mul_flat(g, u, out):
    for i in range(g.shape[0]):
        out[i] = max(g[i], F(0)) * u[i]
