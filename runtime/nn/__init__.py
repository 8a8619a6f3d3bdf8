"""Model building blocks composed by ``models/``: the only numerics a model file calls.

Quantization is invisible here: the QTensor's qtype picks the kernel. Devices are too: a model
placed on a GPU (``runtime.backend.place``) carries device weights and device activations, and
each block hands those to the backend's implementation (``OnDevice.ops``).
"""
from __future__ import annotations

import numpy as np

from pocketlm import quant
from pocketlm import kernels
from pocketlm.nn.device import OnDevice
from pocketlm.kernels.attention import attend
from pocketlm.kernels.sparse_attention import CompressedKeys, attend_sparse
from pocketlm.nn.kvcache import LayerCache
from pocketlm.gguf.tensor import QTensor


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMS-normalize each row of x (..., d) and multiply by weight (d,)."""
    if isinstance(x, OnDevice):
        return x.ops.rms_norm(x, weight, eps)
    return kernels.rms_norm(x, weight, eps)


def rope(x: np.ndarray, positions: np.ndarray, n_dims: int, base: float, mode: str = "neox",
         freq_scale: float = 1.0, freq_factors: np.ndarray | None = None) -> np.ndarray:
    """Rotary embedding of x (n, heads, head_dim) in place; see ``runtime.kernels.rope``."""
    if isinstance(x, OnDevice):
        if freq_factors is not None:
            raise ValueError("rope frequency factors (LongRoPE) have no CUDA kernel; "
                             "use device 'cpu'")
        return x.ops.rope(x, positions, n_dims, base, mode, freq_scale)
    return kernels.rope(x, positions, n_dims, base, mode, freq_scale, freq_factors=freq_factors)


def linear(w: QTensor, x: np.ndarray) -> np.ndarray:
    """x (n, cols) → (n, rows): x·wᵀ. One token takes the matvec (decode) path."""
    if isinstance(x, OnDevice):
        return x.ops.linear(w, x)
    if x.shape[0] == 1:
        return kernels.matvec(w, x[0])[None, :]
    return kernels.matmul(w, x)


def linears(ws: list, x: np.ndarray) -> list[np.ndarray]:
    """``[linear(w, x) for w in ws]`` for weights sharing the input (q/k/v, gate/up): in
    decode one kernel call serves them all."""
    if isinstance(x, OnDevice):
        return [x.ops.linear(w, x) for w in ws]
    return kernels.matmul_many(ws, x)


def embed(table: QTensor, ids: np.ndarray) -> np.ndarray:
    """Rows of an embedding table (any qtype) as float32 (n, dim)."""
    if isinstance(table, OnDevice):
        return table.ops.embed(table, ids)
    return quant.dequantize(table.qtype, table.data[ids], (len(ids), table.cols))


def head_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis of x (n, heads, head_dim), as q/k norms need."""
    n, h, d = x.shape
    return rms_norm(x.reshape(n * h, d), weight, eps).reshape(n, h, d)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, cache: LayerCache,
              positions: np.ndarray, scale: float, softcap: float = 0.0) -> np.ndarray:
    """Store k, v (n, KVH, D) in the layer cache, attend with q (n, H, D); returns (n, H*D)."""
    if isinstance(q, OnDevice):
        return q.ops.attention(q, k, v, cache, positions, scale, softcap)
    cache.store(k, v, positions)
    out = attend(q, cache.kt, cache.v, cache.slot_pos, cache.n_slots, positions, scale,
                 cache.window, softcap)
    return out.reshape(q.shape[0], -1)


def sparse_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, cache: LayerCache,
                     positions: np.ndarray, scale: float, keys: CompressedKeys) -> np.ndarray:
    """``attention`` with InfLLM v2 block selection (``keys``: the layer's compressed keys)
    once the sequence reaches the switch length; dense, by the same kernels, before."""
    if isinstance(q, OnDevice):
        raise ValueError("sparse attention has no CUDA kernel; use device 'cpu'")
    if cache.window > 0:
        raise ValueError("sparse attention needs a global (non-sliding-window) layer")
    last = int(positions.max())
    if last + 1 < keys.cfg.dense_len:
        return attention(q, k, v, cache, positions, scale)
    cache.store(k, v, positions)
    keys.update(cache.kt, int(positions.min()), last)
    out = attend_sparse(q, cache.kt, cache.v, cache.slot_pos, cache.n_slots, positions, scale,
                        keys)
    return out.reshape(q.shape[0], -1)


_ACT = {"silu": kernels.silu_mul, "gelu": kernels.gelu_tanh_mul, "relu": kernels.relu_mul}


def glu(g: np.ndarray, u: np.ndarray, act: str) -> np.ndarray:
    """act(g) * u with act one of silu, gelu (tanh approximation), relu."""
    if isinstance(g, OnDevice):
        return g.ops.glu(g, u, act)
    return _ACT[act](g, u)


def glu_ffn(x: np.ndarray, gate: QTensor, up: QTensor, down: QTensor, act: str) -> np.ndarray:
    """down(act(gate·x) * up·x) for x (n, dim)."""
    g, u = linears([gate, up], x)
    return linear(down, glu(g, u, act))
