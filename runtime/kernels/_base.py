"""Shared numeric helpers for the kernels: half/bfloat conversions, compile settings."""
from __future__ import annotations

import contextlib

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import config, njit, types
from numba.extending import intrinsic, overload

CPU_FEATURES = llvm.get_host_cpu_features()   # what this host's code may use

U = np.uint64  # unsigned indices: Numba then emits no negative-index wraparound selects

# 'arcp' is left out so divisions (activation scales) round exactly as in C.
FAST = {"nnan", "ninf", "nsz", "contract", "afn", "reassoc"}
OPTS = dict(nogil=True, cache=True, fastmath=FAST)
# For loops with divisions (SiLU, softmax, masks): error_model "numpy" makes a float
# division a plain instruction; Python's model adds a zero-divisor branch per division,
# which keeps the loop from vectorizing.
VEC_OPTS = dict(OPTS, error_model="numpy")


@contextlib.contextmanager
def block_codegen():
    """Compile block-quant kernels with the SLP vectorizer on and the loop vectorizer off.

    The per-block inner loops have constant trip counts (16/32), which LLVM unrolls fully; only
    the SLP vectorizer turns them into SIMD code. Left on, the loop vectorizer instead
    vectorizes the outer loop over blocks (stride 18..210 bytes), i.e. gathers, which is ~3x
    slower. These are Numba's documented NUMBA_SLP_VECTORIZE / NUMBA_LOOP_VECTORIZE switches,
    set only while our block kernels are compiled.
    """
    old = (config.SLP_VECTORIZE, config.LOOP_VECTORIZE)
    config.SLP_VECTORIZE, config.LOOP_VECTORIZE = 1, 0
    try:
        yield
    finally:
        config.SLP_VECTORIZE, config.LOOP_VECTORIZE = old


@njit(inline="always", **OPTS)
def exp_f32(x):
    """exp(x) in float32 within 2 ulp, branch-free so that loops calling it vectorize (libm's
    expf is a call per element, ~7x slower). Below -87.33 (results under float32's normal
    range) it returns 0, so masked scores (-1e30) weigh nothing; above 88.37, 2.4e38.

    2**n * exp(r) with n = rint(x / ln 2), r = x - n ln 2 in two parts (Cody-Waite), exp(r)
    by Cephes' degree-7 polynomial.
    """
    lo = x < np.float32(-87.33654)
    x = min(max(x, np.float32(-87.33654)), np.float32(88.37626))
    n = np.rint(x * np.float32(1.442695))
    r = x - n * np.float32(0.693359375)
    r = r + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    y = p * (r * r) + r + np.float32(1)
    e = np.uint32(np.uint32(np.int32(n) + np.int32(127)) << np.uint32(23))
    return np.float32(0) if lo else y * e.view(np.float32)


@njit(inline="always", **OPTS)
def silu_f32(x):
    """x * sigmoid(x) from ``exp_f32``."""
    return x / (np.float32(1) + exp_f32(-x))


@njit(inline="always", **OPTS)
def tanh_f32(x):
    """tanh(x) from ``exp_f32``: 1 - 2 / (exp(2x) + 1); absolute error below 3e-7."""
    return np.float32(1) - np.float32(2) / (exp_f32(np.float32(2) * x) + np.float32(1))


@intrinsic
def _fpext_half(typingctx, h):
    """uint16 bits of an IEEE half -> float32 by LLVM's fpext: one vcvtph2ps with F16C."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


if CPU_FEATURES.get("f16c", False):
    @njit(inline="always", **OPTS)
    def u16f(h):
        """IEEE half given as uint16 -> float32, exactly (the CPU's conversion)."""
        return _fpext_half(np.uint16(h))
else:   # without F16C fpext would be a library call that Numba's JIT may not link
    @njit(inline="always", **OPTS)
    def u16f(h):
        """IEEE half given as uint16 -> float32; exact for normals, subnormals and zeros.

        The exponent is rebiased in the integer domain: a float multiply by 2**112 would be
        reassociated by fastmath into neighbouring products and overflow.
        """
        h = np.uint32(h)
        mag = np.uint32(((h & np.uint32(0x7FFF)) << np.uint32(13)) + np.uint32(0x38000000)).view(np.float32)
        if (h & np.uint32(0x7C00)) == np.uint32(0):
            mag = np.float32(h & np.uint32(0x3FF)) * np.float32(5.9604645e-08)  # subnormal: m * 2**-24
        return np.uint32(np.float32(mag).view(np.uint32) | ((h & np.uint32(0x8000)) << np.uint32(16))).view(np.float32)


def load_f32(a, i):
    """a[i] as float32, for arrays of float32 or of IEEE halves held as uint16 (the KV
    cache's two storage types): one kernel source compiles for either."""
    return np.float32(a[i])


@overload(load_f32)
def _load_f32(a, i):
    if a.dtype == types.uint16:
        return lambda a, i: u16f(a[i])
    return lambda a, i: a[i]


@njit(inline="always", **OPTS)
def h2f(lo, hi):
    """IEEE half (two little-endian bytes) -> float32."""
    return u16f(np.uint32(lo) | (np.uint32(hi) << np.uint32(8)))


@njit(inline="always", **OPTS)
def bf2f(h):
    """bfloat16 given as uint16 -> float32."""
    return np.uint32(np.uint32(h) << np.uint32(16)).view(np.float32)


@njit(inline="always", **OPTS)
def f32_at(w, o):
    """Little-endian float32 stored at byte offset o of a uint8 array."""
    b = (np.uint32(w[o]) | (np.uint32(w[o + U(1)]) << np.uint32(8))
         | (np.uint32(w[o + U(2)]) << np.uint32(16)) | (np.uint32(w[o + U(3)]) << np.uint32(24)))
    return np.uint32(b).view(np.float32)


@njit(**OPTS)
def round_f16(v):
    """float32 -> nearest float16 (ties to even), returned as float32."""
    v = np.float32(v)
    bits = np.float32(v).view(np.uint32)
    sign = bits & np.uint32(0x80000000)
    a = bits & np.uint32(0x7FFFFFFF)
    if a >= np.uint32(0x7F800000):           # inf / nan pass through
        return v
    if a >= np.uint32(0x477FF000):           # >= 65520 rounds to inf
        return np.uint32(sign | np.uint32(0x7F800000)).view(np.float32)
    if a < np.uint32(0x38800000):            # f16 subnormal range: multiples of 2**-24
        m = np.rint(np.abs(v) * np.float32(16777216.0)) * np.float32(5.9604645e-08)
        return -m if sign else m
    a = (a + np.uint32(0xFFF) + ((a >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
    return np.uint32(sign | a).view(np.float32)


@njit(**OPTS)
def round_bf16(v):
    """float32 -> nearest bfloat16 (ties to even, as ggml), returned as float32."""
    u = np.float32(v).view(np.uint32)
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return v
    u = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)) << np.uint32(16)
    return np.uint32(u).view(np.float32)
