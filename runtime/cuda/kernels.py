"""Numba CUDA kernels: quantized matmul (matvec = one token), embedding rows, RMSNorm, RoPE,
attention over the KV cache, KV stores, element-wise ops.

Weights stay as their raw ggml blocks on the device: ``w`` uint8 (rows, row_bytes) and ``h``,
the same memory viewed as float16 (rows, row_bytes/2) so the f16 block scales read directly
(every block size here is even). F32/F16 weights pass their float view as ``h``. Each weight
type has one device function that dequantizes a 32-element chunk of a row into registers;
nothing is dequantized to memory.

Kernels are written to also run under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``):
integer values are widened with ``np.int32`` before arithmetic, and reductions use shared
memory and ``syncthreads`` (the simulator has no warp shuffles).
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda

F32 = np.float32
I32 = np.int32
CHUNK = 32          # weights are dequantized 32 values at a time
TT = 8              # tokens per matmul tile: each dequantized chunk serves TT activations
THREADS = 128       # threads per block of the matmul kernels (lanes x rows)
NEG = F32(-1e30)    # masked attention score


# --------------------------------------------------------------------- 32-value dequantizers
# deq(w, h, r, c, buf): chunk c (values c*32 .. c*32+31) of row r into buf[0:32].

@cuda.jit(device=True)
def deq_f32(w, h, r, c, buf):
    for i in range(CHUNK):
        buf[i] = F32(h[r, c * CHUNK + i])


@cuda.jit(device=True)
def deq_q4_0(w, h, r, c, buf):
    # 18 bytes: d f16, 16 bytes: value j in the low nibble of byte j, value j+16 in its high
    d = F32(h[r, c * 9])
    o = c * 18 + 2
    for j in range(16):
        q = I32(w[r, o + j])
        buf[j] = d * F32((q & 15) - 8)
        buf[j + 16] = d * F32((q >> 4) - 8)


@cuda.jit(device=True)
def deq_q4_1(w, h, r, c, buf):
    # 20 bytes: d f16, m f16, 16 nibble bytes as Q4_0; value = d*q + m
    d = F32(h[r, c * 10])
    m = F32(h[r, c * 10 + 1])
    o = c * 20 + 4
    for j in range(16):
        q = I32(w[r, o + j])
        buf[j] = d * F32(q & 15) + m
        buf[j + 16] = d * F32(q >> 4) + m


@cuda.jit(device=True)
def deq_q5_0(w, h, r, c, buf):
    # 22 bytes: d f16, qh u32 (bit j: fifth bit of value j), 16 nibble bytes as Q4_0;
    # value = d*(q - 16)
    d = F32(h[r, c * 11])
    o = c * 22
    for j in range(16):
        q = I32(w[r, o + 6 + j])
        hi0 = (I32(w[r, o + 2 + j // 8]) >> (j % 8)) & 1
        hi1 = (I32(w[r, o + 4 + j // 8]) >> (j % 8)) & 1
        buf[j] = d * F32(((q & 15) | (hi0 << 4)) - 16)
        buf[j + 16] = d * F32(((q >> 4) | (hi1 << 4)) - 16)


@cuda.jit(device=True)
def deq_q5_1(w, h, r, c, buf):
    # 24 bytes: d f16, m f16, qh u32, 16 nibble bytes; value = d*q + m
    d = F32(h[r, c * 12])
    m = F32(h[r, c * 12 + 1])
    o = c * 24
    for j in range(16):
        q = I32(w[r, o + 8 + j])
        hi0 = (I32(w[r, o + 4 + j // 8]) >> (j % 8)) & 1
        hi1 = (I32(w[r, o + 6 + j // 8]) >> (j % 8)) & 1
        buf[j] = d * F32((q & 15) | (hi0 << 4)) + m
        buf[j + 16] = d * F32((q >> 4) | (hi1 << 4)) + m


@cuda.jit(device=True)
def deq_q8_0(w, h, r, c, buf):
    # 34 bytes: d f16, 32 int8
    d = F32(h[r, c * 17])
    o = c * 34 + 2
    for j in range(32):
        q = I32(w[r, o + j])
        if q > 127:
            q -= 256
        buf[j] = d * F32(q)


@cuda.jit(device=True)
def deq_q4_k(w, h, r, c, buf):
    # 144-byte super-blocks of 8 sub-blocks: d, dmin f16; 12 bytes of 6-bit scales and mins;
    # 128 nibble bytes, sub-block 2i+k in the nibble k of bytes 32i .. 32i+31
    b = c // 8
    j = c - b * 8
    s = b * 144 + 4
    if j < 4:
        sc = I32(w[r, s + j]) & 63
        mn = I32(w[r, s + j + 4]) & 63
    else:
        sc = (I32(w[r, s + j + 4]) & 15) | ((I32(w[r, s + j - 4]) >> 6) << 4)
        mn = (I32(w[r, s + j + 4]) >> 4) | ((I32(w[r, s + j]) >> 6) << 4)
    d = F32(h[r, b * 72]) * F32(sc)
    m = F32(h[r, b * 72 + 1]) * F32(mn)
    i = j // 2
    shift = (j - i * 2) * 4
    o = b * 144 + 16 + i * 32
    for l in range(32):
        buf[l] = d * F32((I32(w[r, o + l]) >> shift) & 15) - m


@cuda.jit(device=True)
def deq_q6_k(w, h, r, c, buf):
    # 210-byte super-blocks: ql[128], qh[64], int8 scales[16] (one per 16 values), d f16.
    # value 128*hf + 32*k + l: low 4 bits in ql[64*hf + 32*(k%2) + l] at bit 4*(k//2),
    # high 2 bits in qh[32*hf + l] at bit 2k
    b = c // 8
    j = c - b * 8
    hf = j // 4
    k = j - hf * 4
    o = b * 210
    d = F32(h[r, b * 105 + 104])
    lo_at = o + hf * 64 + (k % 2) * 32
    lo_shift = (k // 2) * 4
    hi_at = o + 128 + hf * 32
    for half in range(2):
        sc = I32(w[r, o + 192 + j * 2 + half])
        if sc > 127:
            sc -= 256
        ds = d * F32(sc)
        for l in range(half * 16, half * 16 + 16):
            lo = (I32(w[r, lo_at + l]) >> lo_shift) & 15
            q = lo | (((I32(w[r, hi_at + l]) >> (2 * k)) & 3) << 4)
            buf[l] = ds * F32(q - 32)


# ------------------------------------------------------------------------- quantized matmul
def _make_matmul(deq):
    @cuda.jit
    def matmul(w, h, x, out, n_chunks):
        """out (n, rows) = x (n, cols) · Wᵀ. Block: blockDim.x lanes per row (a power of two),
        blockDim.y rows; grid.y tiles the tokens TT at a time."""
        lane = cuda.threadIdx.x
        lanes = cuda.blockDim.x
        tid = cuda.threadIdx.y * lanes + lane
        r = cuda.blockIdx.x * cuda.blockDim.y + cuda.threadIdx.y
        t0 = cuda.blockIdx.y * TT
        tn = min(TT, x.shape[0] - t0)
        acc = cuda.local.array(TT, np.float32)      # (TT,) partial dots of this lane
        buf = cuda.local.array(CHUNK, np.float32)   # (32,) dequantized weights
        for t in range(TT):
            acc[t] = F32(0.0)
        if r < out.shape[1]:
            for c in range(lane, n_chunks, lanes):
                deq(w, h, r, c, buf)
                base = c * CHUNK
                for t in range(tn):
                    s = F32(0.0)
                    for i in range(CHUNK):
                        s += buf[i] * x[t0 + t, base + i]
                    acc[t] += s
        red = cuda.shared.array((THREADS, TT), np.float32)  # lanes' partials, then row sums
        for t in range(TT):
            red[tid, t] = acc[t]
        cuda.syncthreads()
        step = lanes // 2
        while step > 0:
            if lane < step:
                for t in range(TT):
                    red[tid, t] += red[tid + step, t]
            cuda.syncthreads()
            step //= 2
        if r < out.shape[1]:
            for t in range(lane, tn, lanes):
                out[t0 + t, r] = red[tid - lane, t]
    return matmul


def _make_embed(deq):
    @cuda.jit
    def embed(w, h, ids, out):
        """out (n, cols): rows ``ids`` of the table, dequantized. Thread per (token, chunk)."""
        t = cuda.blockIdx.x
        buf = cuda.local.array(CHUNK, np.float32)
        for c in range(cuda.threadIdx.x, out.shape[1] // CHUNK, cuda.blockDim.x):
            deq(w, h, ids[t], c, buf)
            for i in range(CHUNK):
                out[t, c * CHUNK + i] = buf[i]
    return embed


DEQUANTIZERS = {
    "F32": deq_f32, "F16": deq_f32, "Q4_0": deq_q4_0, "Q4_1": deq_q4_1, "Q5_0": deq_q5_0,
    "Q5_1": deq_q5_1, "Q8_0": deq_q8_0, "Q4_K": deq_q4_k, "Q6_K": deq_q6_k,
}
MATMUL = {q: _make_matmul(f) for q, f in DEQUANTIZERS.items()}
EMBED = {q: _make_embed(f) for q, f in DEQUANTIZERS.items()}


def matmul_geometry(rows: int, n_chunks: int, n_tokens: int):
    """(grid, block) of a matmul launch: lanes per row grow with the row length (each lane
    takes at least 16 chunks), rows fill the rest of a THREADS-thread block."""
    lanes = 1
    while lanes < 32 and lanes * 16 < n_chunks:
        lanes *= 2
    per_block = THREADS // lanes
    return ((rows + per_block - 1) // per_block, (n_tokens + TT - 1) // TT), (lanes, per_block)


# ------------------------------------------------------------------------------ small ops
@cuda.jit
def rms_norm(x, w, eps, out):
    """out = x / sqrt(mean(x²) + eps) * w over rows of x (n, d); one block per row, sum in f64
    as ggml."""
    t = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    red = cuda.shared.array(128, np.float64)
    s = 0.0
    for i in range(tid, x.shape[1], cuda.blockDim.x):
        v = np.float64(x[t, i])
        s += v * v
    red[tid] = s
    cuda.syncthreads()
    step = cuda.blockDim.x // 2
    while step > 0:
        if tid < step:
            red[tid] += red[tid + step]
        cuda.syncthreads()
        step //= 2
    scale = F32(1.0) / math.sqrt(F32(red[0] / x.shape[1]) + eps)
    for i in range(tid, x.shape[1], cuda.blockDim.x):
        out[t, i] = x[t, i] * scale * w[i]


@cuda.jit
def rope(x, pos, n_dims, theta_scale, freq_scale, neox, out):
    """Rotary embedding of x (n, heads, head_dim); thread per (token, head). Angles as the CPU
    kernel makes them: theta_0 = pos*freq_scale, theta_{i+1} = theta_i*theta_scale, in f32."""
    t = cuda.blockIdx.x
    hh = cuda.threadIdx.x
    if hh >= x.shape[1]:
        return
    half = n_dims // 2
    theta = F32(pos[t]) * freq_scale
    for i in range(half):
        if neox:
            a = i
            b = i + half
        else:
            a = 2 * i
            b = 2 * i + 1
        cs = math.cos(theta)
        sn = math.sin(theta)
        x0 = x[t, hh, a]
        x1 = x[t, hh, b]
        out[t, hh, a] = x0 * cs - x1 * sn
        out[t, hh, b] = x0 * sn + x1 * cs
        theta *= theta_scale
    for i in range(n_dims, x.shape[2]):
        out[t, hh, i] = x[t, hh, i]


@cuda.jit
def attention(q, kt, v, slot_pos, n_slots, q_pos, scale, window, softcap, sc, out):
    """softmax(q·kᵀ·scale + mask)·v; one block per (query token, head), threads over slots then
    over head dims. q (n, H, D); keys transposed kt (KVH, D, S); v (S, KVH, D); sc (n, H, S)
    scratch. A key at position sp is seen from position p when 0 <= sp <= p and, with a window,
    p - sp < window; a query that sees nothing gets zeros."""
    t = cuda.blockIdx.x
    hh = cuda.blockIdx.y
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    D = q.shape[2]
    kh = hh // (q.shape[1] // kt.shape[0])
    p = q_pos[t]
    red = cuda.shared.array(128, np.float32)
    m = NEG
    for s in range(tid, n_slots, nt):
        sp = slot_pos[s]
        if sp < 0 or sp > p or (window > 0 and p - sp >= window):
            e = NEG
        else:
            e = F32(0.0)
            for d in range(D):
                e += q[t, hh, d] * kt[kh, d, s]
            e *= scale
            if softcap > 0:
                e = softcap * math.tanh(e / softcap)
        sc[t, hh, s] = e
        m = max(m, e)
    red[tid] = m
    cuda.syncthreads()
    step = nt // 2
    while step > 0:
        if tid < step:
            red[tid] = max(red[tid], red[tid + step])
        cuda.syncthreads()
        step //= 2
    m = red[0]
    cuda.syncthreads()
    z = F32(0.0)
    for s in range(tid, n_slots, nt):
        e = sc[t, hh, s]
        e = math.exp(e - m) if e > NEG else F32(0.0)
        sc[t, hh, s] = e
        z += e
    red[tid] = z
    cuda.syncthreads()
    step = nt // 2
    while step > 0:
        if tid < step:
            red[tid] += red[tid + step]
        cuda.syncthreads()
        step //= 2
    z = red[0]
    inv = F32(1.0) / z if z > 0 else F32(0.0)
    for d in range(tid, D, nt):
        a = F32(0.0)
        for s in range(n_slots):
            e = sc[t, hh, s]
            if e > 0:   # masked slots may never have been written: never read them
                a += e * v[s, kh, d]
        out[t, hh, d] = a * inv


@cuda.jit
def kv_store(k, v, slots, positions, kt, vv, slot_pos):
    """Write k, v (n, KVH, D) into slots (n,): kt (KVH, D, S), vv (S, KVH, D); thread per
    (token, kv head)."""
    t = cuda.blockIdx.x
    kh = cuda.threadIdx.x
    if kh >= k.shape[1]:
        return
    s = slots[t]
    for d in range(k.shape[2]):
        kt[kh, d, s] = k[t, kh, d]
        vv[s, kh, d] = v[t, kh, d]
    if kh == 0:
        slot_pos[s] = positions[t]


# Element-wise kernels stride over the array: launch any number of threads (``flat_geometry``).
PER_THREAD = 8


def flat_geometry(n: int):
    """(grid, block) of an element-wise launch over n values, PER_THREAD values a thread."""
    threads = max(1, (n + PER_THREAD - 1) // PER_THREAD)
    block = min(128, threads)
    return (threads + block - 1) // block, block


@cuda.jit
def add(a, b, out):
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[i] = a[i] + b[i]


@cuda.jit
def scale(a, f, out):
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[i] = a[i] * f


SQRT_2_OVER_PI = F32(0.7978845608028654)
GELU_COEF_A = F32(0.044715)
ACT_SILU, ACT_GELU, ACT_RELU = 0, 1, 2


@cuda.jit
def glu(g, u, act, out):
    """act(g) * u element-wise: silu, gelu (tanh approximation) or relu."""
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        x = g[i]
        if act == ACT_SILU:
            y = x / (F32(1.0) + math.exp(-x))
        elif act == ACT_GELU:
            inner = SQRT_2_OVER_PI * x * (F32(1.0) + GELU_COEF_A * x * x)
            y = F32(0.5) * x * (F32(1.0) + math.tanh(inner))
        else:
            y = max(x, F32(0.0))
        out[i] = y * u[i]


@cuda.jit
def gather_rows(x, idx, out):
    """out[t] = x[idx[t]] for x (n, d); one block per output row."""
    t = cuda.blockIdx.x
    for i in range(cuda.threadIdx.x, x.shape[1], cuda.blockDim.x):
        out[t, i] = x[idx[t], i]
