"""Building blocks for bidirectional encoders (BERT family), on one of two backends.

``backend("numba")`` runs the Numba kernels (quantized weights stay in their blocks);
``backend("numpy")`` is plain numpy with weights dequantized to float32 once at load: nothing
is compiled, so it works where Numba cannot JIT, and is the reference the kernels are tested
against. Both offer the same vocabulary: ``weight``, ``linear``, ``layer_norm``, ``gelu``,
``softmax``. Attention with a padding mask, pooling and L2 normalisation are shared numpy.
"""
from __future__ import annotations

import numpy as np

F = np.float32
BACKENDS = ("numba", "numpy")
_NEG = F(-1e30)   # masked score: finite, because the Numba softmax assumes no infinities


# Abramowitz & Stegun 7.1.26: 1 - erf(z) = t*poly(t) * exp(-z^2), t = 1/(1 + p*z), z >= 0,
# |error| < 1.5e-7 (numpy has no erf)
_AS_P = F(0.3275911)
_AS_A = tuple(F(a) for a in (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592))


def _np_gelu(x: np.ndarray) -> np.ndarray:
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


class NumpyBackend:
    name = "numpy"

    @staticmethod
    def weight(w):
        """A QTensor as float32 (rows, cols), dequantized once."""
        return w.dequantize()

    @staticmethod
    def linear(w: np.ndarray, x: np.ndarray, b: np.ndarray) -> np.ndarray:
        """x (n, cols) · wᵀ + b -> (n, rows)."""
        out = x @ w.T
        out += b
        return out

    @staticmethod
    def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
        """As the kernel: mean and variance summed in f64, the rest in f32."""
        xc = x - x.mean(axis=-1, keepdims=True, dtype=np.float64).astype(F)
        var = np.square(xc).mean(axis=-1, keepdims=True, dtype=np.float64).astype(F)
        xc *= F(1) / np.sqrt(var + F(eps))
        xc *= w
        xc += b
        return xc

    gelu = staticmethod(_np_gelu)

    @staticmethod
    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        e /= e.sum(axis=-1, keepdims=True)
        return e


class NumbaBackend:
    name = "numba"

    def __init__(self):
        from pocketlm import kernels, nn
        from pocketlm.kernels import layernorm
        self._linear, self._softmax = nn.linear, kernels.softmax
        self._ln, self._gelu = layernorm.layer_norm, layernorm.gelu_erf

    @staticmethod
    def weight(w):
        """QTensors stay quantized: the kernels read their blocks."""
        return w

    def linear(self, w, x: np.ndarray, b: np.ndarray) -> np.ndarray:
        out = self._linear(w, x)
        out += b
        return out

    def layer_norm(self, x, w, b, eps):
        return self._ln(x, w, b, eps)

    def gelu(self, x):
        return self._gelu(x)

    def softmax(self, x):
        return self._softmax(np.ascontiguousarray(x))


def backend(name: str):
    """The ``"numba"`` or ``"numpy"`` backend."""
    if name == "numba":
        return NumbaBackend()
    if name == "numpy":
        return NumpyBackend()
    raise ValueError(f"backend {name!r}: expected one of {', '.join(BACKENDS)}")


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
