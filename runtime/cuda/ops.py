"""The CUDA side of ``pocketlm.nn``: device arrays, device weights, and ``CudaOps`` on them.

All kernels run on one compute stream (copies of streamed experts use another, see
``runtime.cuda.model``). Activations are ``DArray``: float32 device arrays that add, scale,
reshape and slice on the device; anything else numpy does to them works on a host copy
(``np.asarray(a)``), which is how host-side code such as expert routing reads them.
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from pocketlm.gguf.tensor import QTensor
from pocketlm.nn.kvcache import LayerCache
from pocketlm.nn.ops import Ops

from . import kernels as K

_streams: list = []


def stream():
    """The compute stream (made on first use)."""
    if not _streams:
        _streams.append(cuda.stream())
    return _streams[0]


def _pow2_threads(work: int) -> int:
    """Threads for a reduction over ``work`` items: a power of two, at most 32 (no idle lanes
    on short rows; the simulator runs each one as a Python thread)."""
    t = 1
    while t < 32 and t < work:
        t *= 2
    return t


def empty(shape) -> "DArray":
    return DArray(cuda.device_array(shape, np.float32, stream=stream()))


def upload(a: np.ndarray, s=None):
    """A device copy of host array ``a`` (C-contiguous)."""
    return cuda.to_device(np.ascontiguousarray(a), stream=s or stream())


class DArray:
    """A float32 C-contiguous device array standing in for a numpy activation."""

    __slots__ = ("a",)

    def __init__(self, a):
        self.a = a

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.a.shape)

    @property
    def ndim(self) -> int:
        return len(self.a.shape)

    dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.a.shape[0]

    def reshape(self, *shape) -> "DArray":
        return DArray(self.a.reshape(*shape))

    def __getitem__(self, idx) -> "DArray":
        if isinstance(idx, (np.ndarray, list)):    # rows by index: a gather on the device
            idx = np.asarray(idx, np.int64)
            if idx.ndim != 1 or self.ndim != 2:
                raise IndexError("device arrays take 1-D row indices of 2-D arrays only")
            out = empty((len(idx), self.shape[1]))
            if len(idx):
                K.gather_rows[len(idx), 8, stream()](self.a, upload(idx), out.a)
            return out
        if not isinstance(idx, slice) or idx.step not in (None, 1):
            raise IndexError("device arrays take row slices or row indices only")
        return DArray(self.a[idx])

    def _elementwise(self, kernel, *args) -> "DArray":
        # kernel(a, *args, out) over the flattened array; array arguments are DArrays
        out = empty(self.shape)
        n = int(np.prod(self.shape))
        flat = [a.a.reshape(n) if isinstance(a, DArray) else a for a in args]
        grid, block = K.flat_geometry(n)
        kernel[grid, block, stream()](self.a.reshape(n), *flat, out.a.reshape(n))
        return out

    def __add__(self, other) -> "DArray":
        if not isinstance(other, DArray):
            other = DArray(upload(np.asarray(other, np.float32)))
        if other.shape != self.shape:
            raise ValueError(f"shapes {self.shape} and {other.shape} do not add")
        return self._elementwise(K.add, other)

    __radd__ = __add__

    def __mul__(self, f) -> "DArray":
        if not np.isscalar(f):
            return NotImplemented
        return self._elementwise(K.scale, np.float32(f))

    __rmul__ = __mul__

    def numpy(self) -> np.ndarray:
        """A host copy."""
        s = stream()
        host = self.a.copy_to_host(stream=s)
        s.synchronize()
        return host

    def __array__(self, dtype=None, copy=None):
        host = self.numpy()
        return host if dtype is None else host.astype(dtype)

    def astype(self, dtype) -> np.ndarray:
        """A host copy in ``dtype`` (host code such as routing reads activations this way)."""
        return self.numpy().astype(dtype)


class DeviceTensor:
    """A weight's raw blocks on the device (``w`` uint8 and ``h``, its f16/f32 view).

    ``host`` is the QTensor it came from; ``to_host`` makes ``linear`` return numpy (the output
    head: logits go to the sampler)."""

    __slots__ = ("qtype", "shape", "w", "h", "host", "to_host")

    def __init__(self, qtype: str, shape: tuple[int, ...], w, host: QTensor | None = None,
                 to_host: bool = False):
        self.qtype, self.shape, self.w, self.host, self.to_host = qtype, shape, w, host, to_host
        self.h = w.view(np.float32 if qtype == "F32" else np.float16)

    @classmethod
    def from_host(cls, t: QTensor, name: str = "weight") -> "DeviceTensor":
        check_supported(t.qtype, t.shape, name)
        return cls(t.qtype, tuple(t.shape), upload(t.data.reshape(t.rows, -1)), t)

    @classmethod
    def empty_like(cls, t: QTensor) -> "DeviceTensor":
        """Room for a weight of ``t``'s type and shape (expert slots)."""
        w = cuda.device_array(t.data.reshape(t.rows, -1).shape, np.uint8, stream=stream())
        return cls(t.qtype, tuple(t.shape), w)

    def head(self) -> "DeviceTensor":
        """The same device memory as an output head (results to the host)."""
        return DeviceTensor(self.qtype, self.shape, self.w, self.host, to_host=True)

    @property
    def rows(self) -> int:
        return int(np.prod(self.shape[:-1]))

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def nbytes(self) -> int:
        return self.w.nbytes

    def dequantize(self) -> np.ndarray:
        """float32 host array of ``shape`` (from the host blocks)."""
        return self.host.dequantize()


def check_supported(qtype: str, shape, name: str):
    if qtype not in K.DEQUANTIZERS:
        raise ValueError(f"{name}: the CUDA backend has no kernel for weight type {qtype} "
                         f"(it runs {', '.join(K.DEQUANTIZERS)})")
    if shape[-1] % K.CHUNK:
        raise ValueError(f"{name}: {shape[-1]} columns are not a multiple of {K.CHUNK}")


# ------------------------------------------------------------------------- the nn blocks
def linear(w: DeviceTensor, x: DArray):
    """x (n, cols) → (n, rows): x·wᵀ, on the device (numpy out for an output head)."""
    if not isinstance(w, DeviceTensor):
        raise ValueError("a weight on the host met a device activation; place the whole "
                         "model with pocketlm.nn.backend.place")
    n, cols = x.shape
    if cols != w.cols:
        raise ValueError(f"x has {cols} columns, weight has {w.cols}")
    out = empty((n, w.rows))
    grid, block = K.matmul_geometry(w.rows, cols // K.CHUNK, n)
    K.MATMUL[w.qtype][grid, block, stream()](w.w, w.h, x.a, out.a, cols // K.CHUNK)
    return out.numpy() if w.to_host else out


def embed(table: DeviceTensor, ids: np.ndarray) -> DArray:
    """Rows ``ids`` of an embedding table as float32 (n, dim) on the device."""
    ids = np.asarray(ids, np.int64)
    if len(ids) and (ids.min() < 0 or ids.max() >= table.rows):
        raise ValueError(f"token id out of range [0, {table.rows})")
    out = empty((len(ids), table.cols))
    threads = min(32, table.cols // K.CHUNK)
    K.EMBED[table.qtype][len(ids), threads, stream()](table.w, table.h, upload(ids), out.a)
    return out


def rms_norm(x: DArray, weight, eps: float) -> DArray:
    """RMSNorm over the last axis of x (..., d) times weight (d,) (a device array)."""
    x2 = x.a.reshape(-1, x.shape[-1])
    out = empty(x.shape)
    threads = _pow2_threads(x2.shape[1] // 8)
    K.rms_norm[x2.shape[0], threads, stream()](x2, weight, np.float32(eps),
                                               out.a.reshape(x2.shape))
    return out


def rope(x: DArray, positions: np.ndarray, n_dims: int, base: float, mode: str = "neox",
         freq_scale: float = 1.0) -> DArray:
    """Rotary embedding of x (n, heads, head_dim) in place, as ``pocketlm.kernels.rope``."""
    if mode not in ("neox", "norm"):
        raise ValueError(f"rope mode {mode!r}: expected 'neox' or 'norm'")
    n, heads, _ = x.shape
    theta_scale = np.float32(base ** (-2.0 / n_dims))
    K.rope[n, heads, stream()](x.a, upload(np.asarray(positions, np.int64)), n_dims,
                               theta_scale, np.float32(freq_scale), mode == "neox", x.a)
    return x


_ACT = {"silu": K.ACT_SILU, "gelu": K.ACT_GELU, "relu": K.ACT_RELU}


def glu(g: DArray, u: DArray, act: str) -> DArray:
    """act(g) * u with act one of silu, gelu (tanh approximation), relu."""
    if g.shape != u.shape:
        raise ValueError(f"gate {g.shape} and up {u.shape} differ")
    return g._elementwise(K.glu, u, _ACT[act])


def attention(q: DArray, k: DArray, v: DArray, cache, positions: np.ndarray, scale: float,
              softcap: float = 0.0) -> DArray:
    """Store k, v (n, KVH, D) in the device layer cache, attend with q (n, H, D); (n, H*D)."""
    cache.store(k, v, positions)
    n, H, D = q.shape
    S = cache.n_slots
    out = empty((n, H, D))
    scratch = cuda.device_array((n, H, max(S, 1)), np.float32, stream=stream())  # (n, H, S)
    K.attention[(n, H), _pow2_threads(S), stream()](
        q.a, cache.kt, cache.v, cache.d_slot_pos, S, upload(np.asarray(positions, np.int64)),
        np.float32(scale), cache.window, np.float32(softcap), scratch, out.a)
    return out.reshape(n, H * D)


def expert(ex, x: DArray, act: str) -> DArray:
    """One MoE expert (pocketlm.nn.moe.Expert of DeviceTensors) on its tokens x (m, n_embd):
    down(act(gate·x) * up·x), dense (on the GPU all rows cost about the same)."""
    h = glu(linear(ex.gate, x), linear(ex.up, x), act)                  # (m, n_ff)
    if ex.down_t:   # stored (n_ff, n_embd): the host multiplies by its dequantized plane
        return DArray(upload(h.numpy() @ ex.down.dequantize()))
    return linear(ex.down, h)


class DeviceLayerCache(LayerCache):
    """A LayerCache whose keys and values live on the device; slot bookkeeping stays on the
    host (``slot_pos``) and is mirrored to ``d_slot_pos`` for the attention kernel."""

    def __init__(self, host: LayerCache):
        self.window, self.capacity = host.window, host.capacity
        kvh, d, s = host.kt.shape
        st = stream()
        self.kt = cuda.device_array((kvh, d, s), np.float32, stream=st)   # (KVH, D, S)
        self.v = cuda.device_array((s, kvh, d), np.float32, stream=st)    # (S, KVH, D)
        self.slot_pos = host.slot_pos                                     # (S,) host
        self.d_slot_pos = upload(self.slot_pos)                       # (S,) device
        self.n_slots = 0

    def store(self, k, v, positions: np.ndarray):
        """Write device k, v (n, KVH, D) for ``positions`` (n,)."""
        positions = np.asarray(positions, np.int64)
        slots = self.claim(positions)
        if isinstance(slots, slice):
            slots = np.arange(slots.start, slots.stop, dtype=np.int64)
        K.kv_store[len(slots), k.shape[1], stream()](
            k.a, v.a, upload(slots), upload(positions), self.kt, self.v,
            self.d_slot_pos)

    def truncate(self, n: int) -> bool:
        ok = super().truncate(n)
        self.d_slot_pos.copy_to_device(self.slot_pos, stream=stream())
        return ok

    def clear(self):
        super().clear()
        self.d_slot_pos.copy_to_device(self.slot_pos, stream=stream())


class CudaOps(Ops):
    """``nn.Ops`` on the GPU: device activations (``DArray``), weights (``DeviceTensor``) and
    KV cache (``DeviceLayerCache``); activations stay float32, as "exact" numerics do."""

    name = "cuda"
    device = "cuda"
    embed = staticmethod(embed)
    rms_norm = staticmethod(rms_norm)
    glu = staticmethod(glu)
    attention = staticmethod(attention)

    def rope(self, x, positions, n_dims, base, mode="neox", freq_scale=1.0, freq_factors=None,
             yarn=None):
        if freq_factors is not None or yarn is not None:
            raise ValueError("rope frequency factors and YaRN have no CUDA kernel; "
                             "use device 'cpu'")
        return rope(x, positions, n_dims, base, mode, freq_scale)

    def linear(self, w, x, b=None):
        if b is not None:
            raise ValueError("biased linear layers have no CUDA kernel; use device 'cpu'")
        return linear(w, x)

    def linears(self, ws, x, bs=None):
        return [self.linear(w, x, b) for w, b in zip(ws, bs or [None] * len(ws))]

    def sparse_attention(self, *args):
        raise ValueError("sparse attention has no CUDA kernel; use device 'cpu'")

    def expert(self, ex, x, act, neurons=None):
        return expert(ex, x, act)

    def layer_cache(self, n_head_kv, head_dim, n_ctx, window, chunk, half_copy=False):
        # np.zeros pages are never touched, so the host cache made here costs no memory
        return DeviceLayerCache(LayerCache(n_head_kv, head_dim, n_ctx, window, chunk))


CUDA = CudaOps()
