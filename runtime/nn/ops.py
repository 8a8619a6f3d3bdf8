"""The ops a model computes with: one object per device and numerics.

A model never names a kernel or a device. It holds an ``Ops`` (``model.ops``) and calls its
building blocks; ``CPUOps`` runs them on the Numba kernels under one numerics ("auto",
"llama" or "exact", see ``CPUOps`` and ``pocketlm.kernels``), ``NumpyOps`` in plain numpy with weights dequantized to
float32 (nothing is compiled, so it works where Numba cannot JIT, and is the reference the
encoder kernels are tested against), and the CUDA backend's ``CudaOps`` on device arrays
(``pocketlm.cuda.ops``). Quantization is invisible too: the QTensor's qtype picks the kernel.

Decoders use rms_norm, rope, linear(s), embed, attention, glu and expert; encoders weight,
linear with a bias, layer_norm, gelu and softmax; the tiny encoders conv_silu, linear_i8 and
linear_f32. An ops object offers what its device can run; the model's capabilities say which
backends it takes.
"""
from __future__ import annotations

import numpy as np

from pocketlm import kernels, quant
from pocketlm.gguf.tensor import QTensor
from pocketlm.kernels import layernorm, tinyops
from pocketlm.kernels.attention import attend
from pocketlm.kernels.sparse_attention import CompressedKeys, attend_sparse
from pocketlm.nn.kvcache import LayerCache

F = np.float32
BACKENDS = ("numba", "numpy")

_GLU = {"silu": kernels.silu_mul, "gelu": kernels.gelu_tanh_mul, "relu": kernels.relu_mul,
        "swiglu_oai": kernels.swiglu_oai_mul}


class Ops:
    """Blocks composed from the others, shared by every device."""

    name = "ops"
    device = "cpu"
    kv_half_copy = False   # whether layer caches keep a float16 copy for decode

    @property
    def prompt(self) -> "Ops":
        """The ops prompts run on (CPU: float activations, see ``CPUOps``)."""
        return self

    @staticmethod
    def embed(table: QTensor, ids):
        """Rows of an embedding table (any qtype) as float32 (n, dim)."""
        return quant.dequantize(table.qtype, table.data[ids], (len(ids), table.cols))

    def head_norm(self, x, weight, eps: float):
        """RMSNorm over the last axis of x (n, heads, head_dim), as q/k norms need."""
        n, h, d = x.shape
        return self.rms_norm(x.reshape(n * h, d), weight, eps).reshape(n, h, d)

    def glu_ffn(self, x, gate: QTensor, up: QTensor, down: QTensor, act: str):
        """down(act(gate·x) * up·x) for x (n, dim)."""
        g, u = self.linears([gate, up], x)
        return self.linear(down, self.glu(g, u, act))

    def layer_cache(self, n_head_kv: int, head_dim: int, n_ctx: int, window: int,
                    chunk: int, half_copy: bool = False) -> LayerCache:
        """One layer's KV cache where this device keeps it; ``half_copy``: with a float16
        copy for decode (``kv_half_copy``)."""
        return LayerCache(n_head_kv, head_dim, n_ctx, window, chunk, half_copy=half_copy)

    def experts_decode(self, exs: list, x, act: str, neurons=None):
        """Several experts on one token in one call where the device has such a kernel
        (``CPUOps``); None here: ``expert`` runs per expert."""
        return None


def _f16(a):
    """a rounded to float16 and back, as llama.cpp's F16 KV cache and attention round."""
    return a.astype(np.float16).astype(F)


class CPUOps(Ops):
    """The Numba kernels under one of ``NUMERICS``:

    - "auto" (the default): decode as llama.cpp's CPU path computes (activations quantized to
      each weight's vec_dot type, 8-bit for quantized weights, exact integer block dots);
      prompts in float activations through BLAS, so that a prompt re-run after a cached
      prefix gets the logits of a fresh run (to float rounding). Decode attention reads
      keys and values rounded to float16, as llama.cpp's default cache holds them
      (``kv_half_copy``); prompts read them in float32.
    - "llama": llama.cpp's arithmetic in prompts too (``kernels.llama_activations``), with
      queries, keys, values and attention weights rounded to float16, as its F16 KV cache
      without flash attention (llama-cpp-python's default) rounds them: for comparing with
      llama.cpp's numbers, which then agree to float rounding until a rounding boundary.
    - "exact": float activations and attention throughout, within float32 rounding of exact
      math.
    """

    name = "numba"
    NUMERICS = ("auto", "llama", "exact")

    def __init__(self, numerics: str = "auto"):
        if numerics not in self.NUMERICS:
            raise ValueError(f"numerics {numerics!r}: expected one of {', '.join(self.NUMERICS)}")
        self.numerics = numerics
        self._llama = numerics == "llama"   # llama.cpp's rounding at BLAS sizes, f16 attention
        # the kernels' numerics: 8-bit activations but under "exact"
        self._k = "exact" if numerics == "exact" else "llama"

    @property
    def prompt(self) -> "CPUOps":
        return EXACT if self.numerics == "auto" else self

    @property
    def kv_half_copy(self) -> bool:
        """Decode attention on the 8-bit-activation kernels reads a float16 copy of the
        keys and values (as llama.cpp's default cache keeps them: half the bytes per step);
        "exact" keeps float32 only."""
        return self.numerics != "exact"

    # ------------------------------------------------------------------------ decoders
    def rms_norm(self, x, weight, eps: float):
        """RMS-normalize each row of x (..., d) and multiply by weight (d,)."""
        return kernels.rms_norm(x, weight, eps)

    def rope(self, x, positions, n_dims: int, base: float, mode: str = "neox",
             freq_scale: float = 1.0, freq_factors=None, yarn=None):
        """Rotary embedding of x (n, heads, head_dim) in place; see ``kernels.rope``."""
        return kernels.rope(x, positions, n_dims, base, mode, freq_scale,
                            freq_factors=freq_factors, yarn=yarn)

    def linear(self, w, x, b=None):
        """x (n, cols) → (n, rows): x·wᵀ (+ b). One token takes the matvec (decode) path."""
        if x.shape[0] == 1:
            out = kernels.matvec(w, x[0], numerics=self._k)[None, :]
        else:
            out = kernels.matmul(w, x, numerics=self._k, round_x=self._llama)
        if b is not None:
            out += b
        return out

    def linears(self, ws: list, x, bs=None):
        """``[linear(w, x, b) for w, b in zip(ws, bs)]`` for weights sharing the input (q/k/v,
        gate/up; ``bs``: biases or None each, default none): in decode one kernel call serves
        them all."""
        outs = kernels.matmul_many(ws, x, numerics=self._k, round_x=self._llama)
        return outs if bs is None else [o if b is None else o + b for o, b in zip(outs, bs)]

    def attention(self, q, k, v, cache: LayerCache, positions, scale: float,
                  softcap: float = 0.0, sinks=None):
        """Store k, v (n, KVH, D) in the layer cache, attend with q (n, H, D) → (n, H*D);
        ``sinks`` (H,): per-head attention sinks (``kernels.attention.attend``)."""
        if self._llama:
            q, k, v = _f16(q), _f16(k), _f16(v)
        cache.store(k, v, positions)
        kt, vv = cache.kt, cache.v
        # Decode takes the kernel: on the float16 copy where the cache has one. A one-token
        # prompt beside such a copy goes through BLAS: the float32 kernel then never
        # compiles where decode does not need it (a first chat's cold start).
        kernel = len(q) == 1 and (cache.kt16 is None or self._k == "llama")
        if kernel and cache.kt16 is not None:
            kt, vv = cache.kt16, cache.v16
        out = attend(q, kt, vv, cache.slot_pos, cache.n_slots, positions, scale,
                     cache.window, softcap, f16=self._llama, sinks=sinks, kernel=kernel)
        return out.reshape(q.shape[0], -1)

    def sparse_attention(self, q, k, v, cache: LayerCache, positions, scale: float,
                         keys: CompressedKeys):
        """``attention`` with InfLLM v2 block selection (``keys``: the layer's compressed
        keys) once the sequence reaches the switch length; dense, by the same kernels,
        before."""
        if cache.window > 0:
            raise ValueError("sparse attention needs a global (non-sliding-window) layer")
        last = int(positions.max())
        if last + 1 < keys.cfg.dense_len:
            return self.attention(q, k, v, cache, positions, scale)
        if self._llama:
            q, k, v = _f16(q), _f16(k), _f16(v)
        cache.store(k, v, positions)
        keys.update(cache.kt, int(positions.min()), last)
        out = attend_sparse(q, cache.kt, cache.v, cache.slot_pos, cache.n_slots, positions,
                            scale, keys)
        return out.reshape(q.shape[0], -1)

    def glu(self, g, u, act: str):
        """act(g) * u with act one of silu, gelu (tanh approximation), relu; or "swiglu_oai",
        gpt-oss's clamped form (``kernels.swiglu_oai_mul``)."""
        return _GLU[act](g, u)

    def expert(self, ex, xe, act: str, neurons=None, bias=None):
        """One MoE expert (``moe.Expert``) on its tokens xe (m, n_embd) → (m, n_embd); ReLU
        decode counts its active neurons in ``neurons`` (``moe.NeuronStats``) when given.
        ``bias``: the expert's (gate, up, down) biases, added after each product."""
        bg, bu, bd = (None, None, None) if bias is None else bias
        g = self.linear(ex.gate, xe, bg)                                     # (m, n_ff)
        if act == "relu" and len(xe) == 1 and bu is None:
            # ReGLU: where relu(gate) is 0 the up row is multiplied by 0, so only the active
            # rows of up are computed (exact: each is the same dot product as in the matvec)
            active = np.flatnonzero(g[0] > 0)
            if neurons is not None:
                neurons.active += len(active)
                neurons.total += g.shape[1]
            u = kernels.matvec_rows(ex.up, xe[0], active, numerics=self._k)[None, :]
        else:
            u = self.linear(ex.up, xe, bu)
        h = self.glu(g, u, act)                                              # (m, n_ff)
        if ex.down_t:
            # stored (n_ff, n_embd), as PowerInfer's converter may write it: h · down
            out = h @ ex.down.dequantize()
            return out if bd is None else out + bd
        return self.linear(ex.down, h, bd)

    def experts_decode(self, exs: list, x, act: str, neurons=None):
        """``expert`` for one token (x (1, n_embd)) through each of the experts ``exs`` in
        one kernel call, → (len(exs), n_embd), the same numbers; None where the weights'
        kernel has no fused form (the caller then takes ``expert`` per expert)."""
        fused = kernels.experts_decode(exs, x[0], act, self._k)
        if fused is None:
            return None
        if act == "relu" and neurons is not None:
            neurons.active += fused[1]
            neurons.total += len(exs) * exs[0].gate.shape[-2]
        return fused[0]

    # ------------------------------------------------------------------------ encoders
    @staticmethod
    def weight(w):
        """A weight as this backend reads it: QTensors stay quantized."""
        return w

    def layer_norm(self, x, w, b, eps: float):
        return layernorm.layer_norm(x, w, b, eps)

    def gelu(self, x):
        """GELU with the exact erf."""
        return layernorm.gelu_erf(x)

    def softmax(self, x):
        """Softmax over the last axis."""
        return kernels.softmax(np.ascontiguousarray(x))

    # ------------------------------------------------------------------- tiny encoders
    def conv_silu(self, x, wt, b, n_out: int):
        """Causal depthwise conv + SiLU of x (T, d) for the first ``n_out`` rows → (n_out, C);
        wt (K, C) holds the taps of each output channel in a column."""
        out = np.empty((n_out, wt.shape[1]), F)
        tinyops.dwconv_silu_rows(np.ascontiguousarray(x, F), wt, b, n_out, out)
        return out

    def linear_i8(self, x, wq, ws, b):
        """x (n, k) through int8 rows wq (rows, k) with scales ws: W8A8 per token → (n, rows)."""
        out = np.empty((x.shape[0], wq.shape[0]), F)
        tinyops.linear_i8_rows(np.ascontiguousarray(x, F), wq, ws, b, out)
        return out

    @staticmethod
    def linear_f32(x, w, b):
        """x (n, k) @ w (rows, k)ᵀ + b in f32 (BLAS: the same on both backends)."""
        return (x @ w.T + b).astype(F, copy=False)


class NumpyOps(Ops):
    """Plain numpy, weights dequantized to float32 once: the encoders' no-JIT backend."""

    name = "numpy"

    @staticmethod
    def weight(w):
        """A QTensor as float32 (rows, cols), dequantized once."""
        return w.dequantize()

    @staticmethod
    def linear(w, x, b=None):
        """x (n, cols) · wᵀ (+ b) → (n, rows)."""
        out = x @ w.T
        if b is not None:
            out += b
        return out

    @staticmethod
    def rms_norm(x, weight, eps: float):
        return tinyops.np_rms_norm(x, weight, eps)

    @staticmethod
    def layer_norm(x, w, b, eps: float):
        """As the kernel: mean and variance summed in f64, the rest in f32."""
        xc = x - x.mean(axis=-1, keepdims=True, dtype=np.float64).astype(F)
        var = np.square(xc).mean(axis=-1, keepdims=True, dtype=np.float64).astype(F)
        xc *= F(1) / np.sqrt(var + F(eps))
        xc *= w
        xc += b
        return xc

    @staticmethod
    def gelu(x):
        return tinyops.np_gelu(x)

    @staticmethod
    def softmax(x):
        return tinyops.np_softmax(x)

    def conv_silu(self, x, wt, b, n_out: int):
        return tinyops.np_dwconv_silu(np.ascontiguousarray(x, F), wt, b, n_out)

    def linear_i8(self, x, wq, ws, b):
        return tinyops.np_linear_i8(np.ascontiguousarray(x, F), wq, ws, b)

    linear_f32 = staticmethod(CPUOps.linear_f32)


CPU = CPUOps("auto")
LLAMA = CPUOps("llama")
EXACT = CPUOps("exact")
NUMPY = NumpyOps()


def backend_ops(name: str) -> Ops:
    """The ops of a CPU backend: "numba" (kernels, "auto" numerics) or "numpy"."""
    if name == "numba":
        return CPU
    if name == "numpy":
        return NUMPY
    raise ValueError(f"backend {name!r}: expected one of {', '.join(BACKENDS)}")


class TimedOps:
    """``ops`` with the seconds spent in each leaf op summed by label (``times``): linears by
    weight type ("matvec Q4_K"), "attention", "experts", "embed" and "small ops" (norms,
    rope, activations). Composite blocks (``glu_ffn``, ``head_norm``) run through this
    object, so that their parts are timed as leaves. For the benchmark's breakdown of
    decode time; it costs a clock read per op."""

    _COMPOSITE = {n for n, v in vars(Ops).items() if callable(v) and n != "embed"}

    def __init__(self, ops: Ops):
        import time
        self.inner, self.times, self._clock = ops, {}, time.perf_counter

    def _label(self, name: str, args) -> str:
        if name in ("linear", "linears"):
            ws = args[0] if name == "linears" else [args[0]]
            return "matvec " + "+".join(sorted({w.qtype for w in ws}))
        if name in ("attention", "sparse_attention"):
            return "attention"
        if name == "expert":
            return "experts"
        return "embed" if name == "embed" else "small ops"

    def __getattr__(self, name):
        if name in self._COMPOSITE:
            return getattr(Ops, name).__get__(self)
        fn = getattr(self.inner, name)
        if not callable(fn):
            return fn

        def timed(*args, **kwargs):
            t0 = self._clock()
            try:
                return fn(*args, **kwargs)
            finally:
                label = self._label(name, args)
                self.times[label] = self.times.get(label, 0.0) + self._clock() - t0
        return timed
