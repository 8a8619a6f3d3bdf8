"""pocketlm.kernels vs numpy references: activation-quantized emulation (tight) and float math
on gguf-py dequantized weights (loose, 8-bit activations)."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants as gq

from pocketlm import quant
import pocketlm.kernels as K
from pocketlm.gguf.tensor import QTensor
from pocketlm.gguf.reader import GGUFFile

RNG = np.random.default_rng(0)
Q8_0_ACT = {"Q4_0", "Q5_0", "Q8_0", "MXFP4"}
Q8_1_ACT = {"Q4_1", "Q5_1"}
K_TYPES = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"}
# scale fields (byte offset, f16 or f32) to overwrite in random K-quant blocks
K_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


# ------------------------------------------------------------------------- references
def f16r(v):
    return np.asarray(v, np.float32).astype(np.float16).astype(np.float32)


def act_q8(x, q8_1=False):
    """numpy copy of ggml's AVX2 quantize_row_q8_0 / q8_1 -> (values, d, s) per 32-block."""
    xb = x.reshape(-1, 32).astype(np.float32)
    amax = np.abs(xb).max(1)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        iv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(xb * iv[:, None]).astype(np.float32)
    s = f16r(d * q.sum(1)) if q8_1 else q.sum(1)
    return q, f16r(d), s


def act_q8_k(x):
    """numpy copy of ggml's quantize_row_q8_K_ref -> (values (nb, 256), d (nb,))."""
    xb = x.reshape(-1, 256).astype(np.float32)
    idx = np.abs(xb).argmax(1)
    mx = xb[np.arange(len(xb)), idx]
    q = np.zeros_like(xb)
    d = np.zeros(len(xb), np.float32)
    nz = mx != 0
    iscale = (np.float32(-127) / mx[nz]).astype(np.float32)
    q[nz] = np.minimum(np.float32(127), np.rint(iscale[:, None] * xb[nz]))
    d[nz] = np.float32(1) / iscale
    return q, d


def dequant(qtype, data, cols):
    if qtype == "Q8_K":
        blocks = data.reshape(data.shape[0], -1, 292)
        d = blocks[..., :4].copy().view(np.float32)
        return (d * blocks[..., 4:260].view(np.int8)).reshape(data.shape[0], cols).astype(np.float32)
    return gq.dequantize(data, T[qtype]).reshape(data.shape[0], cols).astype(np.float32)


def emulate(qtype, data, cols, x):
    """Activation-quantized math of llama.cpp in float64: (rows,) result and an error scale."""
    w = dequant(qtype, data, cols).astype(np.float64)
    if qtype in ("F32", "F16", "BF16"):
        xr = x if qtype == "F32" else gq.dequantize(gq.quantize(x, T[qtype]), T[qtype])
        return w @ xr.astype(np.float64), np.abs(w) @ np.abs(xr)
    if qtype in K_TYPES:
        q, d = act_q8_k(x)
        xq = (q * d[:, None]).astype(np.float64).ravel()
        return w @ xq, np.abs(w) @ np.abs(xq)
    q, d, s = act_q8(x, qtype in Q8_1_ACT)
    xq = (q * d[:, None]).astype(np.float64).ravel()
    y = w @ xq
    if qtype in Q8_1_ACT:   # the min term uses the f16-rounded d*sum of the activation block
        bs = GGML_QUANT_SIZES[T[qtype]][1]
        m = data.reshape(data.shape[0], -1, bs)[..., 2:4].copy().view(np.float16)[..., 0]
        y += m.astype(np.float64) @ (s.astype(np.float64) - d * q.sum(1).astype(np.float64))
    return y, np.abs(w) @ np.abs(xq)


def random_weights(qtype, rows, cols):
    if qtype in K_SCALES or qtype == "Q8_K":
        bs = GGML_QUANT_SIZES[T[qtype]][1]
        data = RNG.integers(0, 256, (rows, cols // 256, bs), dtype=np.uint8)
        if qtype == "Q8_K":
            data[..., :4] = RNG.uniform(1e-3, 1e-2, (rows, cols // 256, 1)).astype(np.float32).view(np.uint8)
        for off in K_SCALES.get(qtype, ()):
            h = RNG.uniform(1e-3, 1e-2, (rows, cols // 256, 1)).astype(np.float16)
            data[..., off:off + 2] = h.view(np.uint8)
        return data.reshape(rows, -1)
    w = RNG.standard_normal((rows, cols)).astype(np.float32)
    q = gq.quantize(w, T[qtype])
    return np.ascontiguousarray(q.view(np.uint8).reshape(rows, -1))


ALL = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
       "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "MXFP4"]


def check_matvec(qtype, data, cols, x, out=None):
    got = K.matvec_raw(qtype, data, cols, x, out)
    ref, scale = emulate(qtype, data, cols, x)
    err = np.abs(got - ref)
    assert np.all(err <= 2e-5 * scale + 1e-30), (qtype, float((err / scale).max()))
    # float math on dequantized weights: 8-bit activations cost up to ~1% of sum |w x|
    if qtype not in ("F32",):
        w = dequant(qtype, data, cols).astype(np.float64)
        exact = w @ x.astype(np.float64)
        assert np.all(np.abs(got - exact) <= 1.5e-2 * (np.abs(w) @ np.abs(x)) + 1e-6), qtype
    return got


# ------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("qtype", ALL)
def test_matvec_random(qtype):
    rows, cols = 37, 512
    data = random_weights(qtype, rows, cols)
    x = RNG.standard_normal(cols).astype(np.float32)
    x[:7] = 0  # an all-zero-ish start exercises small blocks
    got = check_matvec(qtype, data, cols, x)
    # a row slice is computed exactly like the same rows of the whole matrix
    sub = K.matvec_raw(qtype, data[5:18], cols, x)
    np.testing.assert_array_equal(sub, got[5:18])
    out = np.empty(rows, np.float32)
    assert K.matvec_raw(qtype, data, cols, x, out) is out
    # zero activation block and zero vector
    assert np.all(K.matvec_raw(qtype, data, cols, np.zeros(cols, np.float32)) == 0)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K", "F16"])
def test_matmul_paths(qtype):
    rows, cols, n = 29, 512, 9
    data = random_weights(qtype, rows, cols)
    x = RNG.standard_normal((n, cols)).astype(np.float32)
    quant = K.matmul_raw(qtype, data, cols, x, method="quant")
    for t in range(n):  # integer path == n independent matvecs, bit for bit
        np.testing.assert_array_equal(quant[t], K.matvec_raw(qtype, data, cols, x[t]))
    w = dequant(qtype, data, cols).astype(np.float64)
    exact = x.astype(np.float64) @ w.T
    scale = np.abs(x) @ np.abs(w).T
    blas = K.matmul_raw(qtype, data, cols, x, method="blas")
    assert np.all(np.abs(blas - exact) <= 1e-5 * scale + 1e-30)
    np.testing.assert_array_equal(K.matmul_raw(qtype, data, cols, x), blas)  # auto: n >= 8


@pytest.mark.parametrize("qtype", ALL)
def test_blas_with_rounded_activations_is_llamas_product(qtype):
    """BLAS with ``round_x`` takes the activations rounded to the weight's vec_dot type
    (Q8_1's f16 block sums included): each row is llama.cpp's product, as the integer path."""
    rows, cols, n = 23, 512, 17
    data = random_weights(qtype, rows, cols)
    x = RNG.standard_normal((n, cols)).astype(np.float32)
    x[0, :64] = 0   # all-zero activation blocks
    got = K.matmul_raw(qtype, data, cols, x, method="blas", round_x=True)
    for t in range(n):
        ref, scale = emulate(qtype, data, cols, x[t])
        assert np.all(np.abs(got[t] - ref) <= 2e-5 * scale + 1e-30), (qtype, t)
    if qtype != "F32":
        assert np.abs(got - K.matmul_raw(qtype, data, cols, x, method="blas")).max() > 0


@pytest.mark.parametrize("qtype", ALL)
def test_dequantize(qtype):
    data = random_weights(qtype, 5, 512)
    np.testing.assert_allclose(K.dequantize_raw(qtype, data, 512), dequant(qtype, data, 512),
                               rtol=1e-6, atol=1e-30)


@pytest.fixture
def llama_numerics(monkeypatch):
    """The registry as on hosts without AVX2: "llama" numerics on the portable kernels
    (prepared weights for Q4_0/Q4_1/Q8_0), restored afterwards."""
    monkeypatch.setattr(K._simd, "AVAILABLE", False)
    monkeypatch.setattr(K, "_REGISTRY", {(n, q): K._entry(n, q)
                                         for n in K.NUMERICS for q in K.QTYPES})


SIMD_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q6_K"]


@pytest.mark.skipif(not K._simd.AVAILABLE, reason="host lacks AVX2/FMA/F16C")
@pytest.mark.parametrize("qtype", SIMD_TYPES)
def test_simd_matvec(qtype):
    """The AVX2 kernels (default numerics) against the float64 emulation of llama.cpp's
    8-bit path, for one row, small batches and selected rows."""
    from pocketlm.gguf.tensor import QTensor
    assert type(K.kernel(qtype)).__name__ == "_Avx2"
    rows, cols = 37, 1536
    data = random_weights(qtype, rows, cols)
    data[3, :2] = 0          # a zero and a subnormal block scale
    data[4, 0], data[4, 1] = 1, 0
    w = QTensor(qtype, (rows, cols), data)
    x = RNG.standard_normal((5, cols)).astype(np.float32)
    x[1, :40] = 0            # all-zero activation blocks
    for t in range(5):
        got = K.matvec(w, x[t])
        ref, scale = emulate(qtype, data, cols, x[t])
        assert np.all(np.abs(got - ref) <= 2e-5 * scale + 1e-30), qtype
    batch = K.matmul(w, x)
    np.testing.assert_array_equal(batch[2], K.matvec(w, x[2]))
    # rows run in pairs: a row's value must not depend on its partner (or on having none)
    full = K.matvec(w, x[0])
    idx = np.array([0, 4, 17, 36, 5])
    sel = K.matvec_rows(w, x[0], idx)
    np.testing.assert_array_equal(sel[idx], full[idx])
    assert not sel[np.setdiff1d(np.arange(rows), idx)].any()
    shifted = QTensor(qtype, (rows - 1, cols), data[1:])
    np.testing.assert_array_equal(K.matvec(shifted, x[0]), full[1:])
    with pytest.raises(ValueError):
        K.matvec(w, x[0, :-32])


@pytest.mark.skipif(not K._simd.AVAILABLE, reason="host lacks AVX2/FMA/F16C")
def test_simd_real_tensors(smollm2_path, gemma3_path):
    seen = set()
    for path, name in [(smollm2_path, "blk.0.ffn_gate.weight"), (smollm2_path, "output.weight"),
                       (gemma3_path, "blk.0.attn_q.weight"), (gemma3_path, "blk.0.attn_v.weight"),
                       (gemma3_path, "blk.1.attn_v.weight"), (gemma3_path, "blk.0.attn_output.weight"),
                       (gemma3_path, "blk.0.ffn_down.weight"), (gemma3_path, "blk.1.ffn_down.weight")]:
        f = GGUFFile(path)
        if name not in f.tensors:
            name = "token_embd.weight"
        w = f.tensor(name)
        x = RNG.standard_normal(w.cols).astype(np.float32)
        rows = slice(3, 70)
        ref, scale = emulate(w.qtype, w.data[rows], w.cols, x)
        got = K.matvec(w, x)[rows]
        assert np.all(np.abs(got - ref) <= 2e-5 * scale + 1e-30), (name, w.qtype)
        seen.add(w.qtype)
    assert seen == set(SIMD_TYPES) - {"Q4_0"}


def test_real_tensors(smollm2_path, gemma3_path, llama_numerics):
    picks = [(smollm2_path, "blk.0.ffn_gate.weight"), (smollm2_path, "blk.0.ffn_down.weight"),
             (gemma3_path, "blk.0.attn_output.weight"), (gemma3_path, "blk.0.ffn_down.weight"),
             (gemma3_path, "blk.0.attn_q.weight"), (gemma3_path, "blk.0.attn_v.weight")]
    seen = set()
    for path, name in picks:
        w = GGUFFile(path).tensor(name)
        seen.add(w.qtype)
        x = RNG.standard_normal(w.cols).astype(np.float32)
        got = check_matvec(w.qtype, w.data[3:70], w.cols, x)   # odd row count, offset slice
        np.testing.assert_array_equal(K.matvec(w, x)[3:70], got, err_msg=f"{name} {w.qtype}")
    assert seen == {"Q4_1", "Q4_K", "Q6_K", "Q5_0", "Q8_0"}


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "MXFP4"])
def test_prepared_matvec_random(qtype, llama_numerics):
    from pocketlm.gguf.tensor import QTensor
    rows, cols = 37, 1536
    data = random_weights(qtype, rows, cols)
    data[3, :2] = 0          # a zero and a subnormal block scale
    data[4, 0], data[4, 1] = 1, 0
    w = QTensor(qtype, (rows, cols), data)
    for _ in range(3):
        x = RNG.standard_normal(cols).astype(np.float32)
        raw = K.matvec_raw(qtype, data, cols, x)
        assert K.prepare(w) is w
        np.testing.assert_array_equal(K.matvec(w, x), raw)   # bit-identical
    out = np.empty(rows, np.float32)
    assert K.matvec(w, x, out) is out
    with pytest.raises(ValueError):
        K.matvec(w, x[:-32])


@pytest.mark.parametrize("portable", [False, True])
def test_prepared_nbytes_is_what_the_kernels_attach(portable, request):
    """The memory planner's count of side arrays: what every numerics' matvec attaches."""
    from pocketlm.gguf.tensor import QTensor
    if portable:
        request.getfixturevalue("llama_numerics")
    for qtype in ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "MXFP4"]:
        w = QTensor(qtype, (37, 512), random_weights(qtype, 37, 512))
        x = RNG.standard_normal(512).astype(np.float32)
        for numerics in K.NUMERICS:
            K.matvec(w, x, numerics=numerics)
        p = w.prepared
        attached = 0 if p is None else p.d.nbytes + p.m.nbytes
        assert attached == K.prepared_nbytes(qtype, 37, 512), (qtype, portable)


def test_prepared_matvec_real(smollm2_path, smollm2_q4_0_path, smollm2_q8_0_path, llama_numerics):
    seen = set()
    for path in (smollm2_path, smollm2_q4_0_path, smollm2_q8_0_path):
        f = GGUFFile(path)
        for name in ("blk.0.ffn_gate.weight", "blk.0.ffn_down.weight", "blk.0.attn_q.weight"):
            w = f.tensor(name)
            if w.qtype not in ("Q4_0", "Q4_1", "Q8_0"):
                continue
            seen.add(w.qtype)
            x = RNG.standard_normal(w.cols).astype(np.float32)
            np.testing.assert_array_equal(K.matvec(w, x), K.matvec_raw(w.qtype, w.data, w.cols, x))
    assert seen == {"Q4_0", "Q4_1", "Q8_0"}


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "MXFP4"])
def test_exact_numerics(qtype):
    """"exact" numerics: float activations, within f32 rounding of float64 math on the
    dequantized weights, for one row (decode) and small batches alike."""
    from pocketlm.gguf.tensor import QTensor
    rows, cols = 37, 1536
    data = random_weights(qtype, rows, cols)
    data[3, :2] = 0
    w = QTensor(qtype, (rows, cols), data)
    wf = dequant(qtype, data, cols).astype(np.float64)
    x = RNG.standard_normal((5, cols)).astype(np.float32)
    exact = x.astype(np.float64) @ wf.T
    scale = np.abs(x) @ np.abs(wf).T
    for t in range(5):
        assert np.all(np.abs(K.matvec(w, x[t], numerics="exact") - exact[t]) <= 1e-6 * scale[t])
    small = K.matmul(w, x, numerics="exact")
    assert np.all(np.abs(small - exact) <= 1e-6 * scale)
    # batch == decode, bit for bit
    np.testing.assert_array_equal(small[2], K.matvec(w, x[2], numerics="exact"))
    with pytest.raises(ValueError, match="numerics 'fast'"):
        K.matvec(w, x[0], numerics="fast")


# --------------------------------------------------------------------------- small ops
def rope_ref(x, pos, n_dims, base, neox, freq_scale=1.0):
    out = x.copy()
    half = n_dims // 2
    ts = np.float32(base ** (-2.0 / n_dims))
    for t, p in enumerate(pos):
        theta = np.float32(p) * np.float32(freq_scale)
        for i in range(half):
            c, s = np.cos(np.float64(theta)), np.sin(np.float64(theta))
            a, b = (i, i + half) if neox else (2 * i, 2 * i + 1)
            x0, x1 = x[t, :, a].astype(np.float64), x[t, :, b].astype(np.float64)
            out[t, :, a] = x0 * c - x1 * s
            out[t, :, b] = x0 * s + x1 * c
            theta = np.float32(theta * ts)
    return out


@pytest.mark.parametrize("mode", ["neox", "norm"])
@pytest.mark.parametrize("n_dims", [16, 10])
def test_rope(mode, n_dims):
    x = RNG.standard_normal((5, 3, 16)).astype(np.float32)
    pos = np.array([0, 1, 7, 100, 3000])
    ref = rope_ref(x, pos, n_dims, 10000.0, mode == "neox", 0.5)
    got = K.rope(x, pos, n_dims, 10000.0, mode, freq_scale=0.5, out=np.empty_like(x))
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5)
    np.testing.assert_array_equal(got[..., n_dims:], x[..., n_dims:])
    y = x.copy()
    assert K.rope(y, pos, n_dims, 10000.0, mode, freq_scale=0.5) is y
    np.testing.assert_array_equal(y, got)
    # exact-angle check at small positions (the f32 angle recurrence drifts at large ones)
    t = np.arange(4)
    inv = 10000.0 ** (-np.arange(n_dims // 2) * 2.0 / n_dims)
    ang = (t[:, None] * 0.5 * inv)[:, None, :]
    xs = x[:4].astype(np.float64)
    a, b = (np.arange(n_dims // 2), np.arange(n_dims // 2) + n_dims // 2) if mode == "neox" else \
        (np.arange(0, n_dims, 2), np.arange(1, n_dims, 2))
    got = K.rope(x[:4].copy(), t, n_dims, 10000.0, mode, freq_scale=0.5)
    np.testing.assert_allclose(got[..., a], xs[..., a] * np.cos(ang) - xs[..., b] * np.sin(ang), atol=1e-5)
    np.testing.assert_allclose(got[..., b], xs[..., a] * np.sin(ang) + xs[..., b] * np.cos(ang), atol=1e-5)


def test_rope_yarn():
    """YaRN (gpt-oss's 32x over 4096): the ramp's pairs and scale as llama.cpp derives them,
    and the rotation against the formula in float64."""
    y = K.yarn(64, 150000.0, 1 / 32, 4096)
    # corr dims: 64 ln(4096 / (beta 2 pi)) / (2 ln 150000) for beta 32 (floor) and 1 (ceil)
    assert (y.ext_factor, y.corr_low, y.corr_high) == (1.0, 8.0, 18.0)
    assert abs(y.attn_factor - 1.0) < 1e-6   # llama.cpp cancels the kernel's magnitude term
    x = RNG.standard_normal((4, 2, 64)).astype(np.float32)
    pos = np.array([0, 3, 50, 700])
    got = K.rope(x.copy(), pos, 64, 150000.0, "neox", freq_scale=1 / 32, yarn=y)
    i = np.arange(32)
    ramp = 1 - np.clip((i - 8.0) / 10.0, 0, 1)
    theta = pos[:, None] * 150000.0 ** (-2.0 * i / 64) * (1 / 32 * (1 - ramp) + ramp)
    m = 1 + 0.1 * np.log(32)
    c, s_ = (np.cos(theta) * m)[:, None], (np.sin(theta) * m)[:, None]
    xa, xb = x[..., :32].astype(np.float64), x[..., 32:].astype(np.float64)
    # angles near 700 rad carry float32 rounding of ~6e-5
    np.testing.assert_allclose(got[..., :32], xa * c - xb * s_, atol=3e-4)
    np.testing.assert_allclose(got[..., 32:], xa * s_ + xb * c, atol=3e-4)


def test_rms_norm_softmax_glu():
    x = RNG.standard_normal((4, 3, 64)).astype(np.float32) * 3
    w = RNG.standard_normal(64).astype(np.float32)
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(K.rms_norm(x, w, 1e-6), ref, rtol=2e-6, atol=1e-6)
    e = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    np.testing.assert_allclose(K.softmax(x), e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)
    g, u = x[0], x[1]
    g64 = g.astype(np.float64)
    np.testing.assert_allclose(K.silu_mul(g, u), g64 / (1 + np.exp(-g64)) * u, rtol=1e-5, atol=1e-6)
    gelu = 0.5 * g64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (g64 + 0.044715 * g64 ** 3)))
    np.testing.assert_allclose(K.gelu_tanh_mul(g, u), gelu * u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(K.relu_mul(g, u), np.maximum(g, 0) * u)
    # gpt-oss: gate clamped above at 7, up to [-7, 7] (9 x reaches past both)
    g, u = g * 3, u * 3
    g64 = g.astype(np.float64)
    assert g.max() > 7 and u.min() < -7
    gc, uc = np.minimum(g64, 7.0), np.clip(u.astype(np.float64), -7.0, 7.0)
    np.testing.assert_allclose(K.swiglu_oai_mul(g, u), gc / (1 + np.exp(-1.702 * gc)) * (uc + 1),
                               rtol=1e-5, atol=1e-6)


def test_threads_and_warmup():
    before = K.get_threads()
    K.set_threads(1)
    assert K.get_threads() == 1
    K.set_threads(before)
    assert K.warmup() >= 0


def test_shape_errors():
    data = random_weights("Q4_K", 3, 512)
    with pytest.raises(ValueError):
        K.matvec_raw("Q4_K", data[:, :144], 288, np.zeros(288, np.float32))
    with pytest.raises(ValueError):
        K.matvec_raw("Q4_K", data, 512, np.zeros(256, np.float32))
    with pytest.raises(NotImplementedError):
        K.matvec_raw("IQ4_NL", data, 512, np.zeros(512, np.float32))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "MXFP4"])
def test_matvec_rows_equals_matvec_on_selected_rows(qtype):
    """Under "exact" numerics the row-selecting matvec (ReGLU sparsity) gives matvec's values
    on the chosen rows (to float32 rounding: LLVM may order the block sums differently in
    the two drivers) and leaves the others zero; both agree with float64 numpy on
    dequantized weights. The AVX2 kernels are bit-identical (test_simd_matvec)."""
    rng = np.random.default_rng(11)
    w32 = rng.standard_normal((80, 256)).astype(np.float32)
    w = QTensor(qtype, (80, 256), quant.quantize(qtype, w32).reshape(80, -1))
    x = rng.standard_normal(256).astype(np.float32)
    rows = np.flatnonzero(rng.random(80) < 0.4)
    got = K.matvec_rows(w, x, rows, numerics="exact")
    full = K.matvec(w, x, numerics="exact")
    np.testing.assert_allclose(got[rows], full[rows], rtol=1e-6, atol=1e-6 * np.abs(full).max())
    assert not np.any(np.delete(got, rows))
    ref = w.dequantize().astype(np.float64)[rows] @ x.astype(np.float64)
    np.testing.assert_allclose(got[rows], ref, rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(not K._simd.AVAILABLE, reason="host lacks AVX2/FMA/F16C")
@pytest.mark.parametrize("qtype,act", [("Q4_0", "relu"), ("Q4_0", "silu"), ("Q8_0", "relu"),
                                       ("Q4_K", "silu")])
def test_experts_decode_equals_separate_calls(qtype, act):
    """The one-call experts (gate and up rows of all, GLU, down of all) give each expert's
    separate calls' numbers, bit for bit."""
    from pocketlm.nn.moe import Expert
    n_embd, n_ff, k = 512, 768, 3
    exs = [Expert(*(QTensor(qtype, shape, random_weights(qtype, *shape))
                    for shape in ((n_ff, n_embd), (n_ff, n_embd), (n_embd, n_ff))))
           for _ in range(k)]
    x = RNG.standard_normal(n_embd).astype(np.float32)
    got, n_rows = K.experts_decode(exs, x, act)
    assert got.shape == (k, n_embd)
    total = 0
    for ex, y in zip(exs, got):
        g = K.matvec(ex.gate, x)
        if act == "relu":
            rows = np.flatnonzero(g > 0)
            h = K.relu_mul(g, K.matvec_rows(ex.up, x, rows))
            total += len(rows)
        else:
            h = K.silu_mul(g, K.matvec(ex.up, x))
            total += n_ff
        np.testing.assert_array_equal(y, K.matvec(ex.down, h))
    assert n_rows == total and (act == "silu" or total < k * n_ff)
    assert K.experts_decode(exs, x, "gelu") is None      # no fused GELU
    with pytest.raises(ValueError):
        K.experts_decode(exs, x[:256], act)
