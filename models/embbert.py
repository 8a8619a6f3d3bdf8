"""EmbBERT-Q (arXiv:2502.10001): a ~2 MB text classifier (GGUF arch ``embbert``).

Nano embedder (token and position rows of width r, each expanded to d by a bias-free linear,
plus a segment table), then N layers of RMSNorm -> two branches combined without a residual:
single-query-projection attention (keys and values are the normed input itself) and a causal
depthwise conv + SiLU + linear, mixed as x = λ1·a1 − λ2·a2 with λ = exp(<λq, λk>). A linear
head reads position 0. Layout and int8 format: docs/embbert-gguf.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from pocketlm.models.base import MAX_LAYERS, QTYPES, Capabilities, GGUFArgs, key
from pocketlm import nn

F = np.float32


def _single_head(v) -> int:
    if int(v) != 1:
        raise ValueError("embbert: only single-head attention is defined")
    return 1


@dataclass(frozen=True)
class ModelArgs(GGUFArgs):
    tensor_types = QTYPES + ("I8",)   # int8 embeddings and projections
    n_head: int = key("attention.head_count", default=1, convert=_single_head)
    n_ctx: int = key("context_length")              # L: positions
    n_embd: int = key("embedding_length", min=1)    # d
    n_layer: int = key("block_count", min=1, max=MAX_LAYERS)
    n_inner: int = key("feed_forward_length")       # d_inner = d * forward expansion (conv)
    conv_kernel: int = key("conv_kernel")           # K
    eps: float = key("attention.layer_norm_rms_epsilon")
    labels: tuple[str, ...] = key("classifier.output_labels", default=())
    pad_id: int = key("tokenizer.ggml.padding_token_id", default=0)
    sep_id: int = key("tokenizer.ggml.seperator_token_id", default=4)


def _vector(t, n: int, name: str) -> np.ndarray:
    v = t if isinstance(t, np.ndarray) else t.dequantize()
    if v.shape != (n,):
        raise ValueError(f"embbert: tensor {name} has shape {v.shape}, expected ({n},)")
    return np.ascontiguousarray(v, F)


def _linear(src, name: str, rows: int, cols: int, bias: bool = True) -> SimpleNamespace:
    """A linear layer in runtime form: int8 rows + per-row scales, or a float32 matrix."""
    t = getattr(src, name, None)
    if t is None:
        raise ValueError(f"embbert: model lacks tensor {name}")
    if t.shape != (rows, cols):
        raise ValueError(f"embbert: tensor {name} has shape {t.shape}, expected ({rows}, {cols})")
    b = _vector(getattr(src, name + "_b"), rows, name + ".bias") if bias else np.zeros(rows, F)
    if t.qtype == "I8":
        scale = getattr(src, name + "_scale", None)
        if scale is None:
            raise ValueError(f"embbert: int8 tensor {name} has no {name}.scale")
        return SimpleNamespace(wq=t.data.view(np.int8), ws=_vector(scale, rows, name + ".scale"),
                               w=None, b=b)
    return SimpleNamespace(wq=None, ws=None, w=np.ascontiguousarray(t.dequantize(), F), b=b)


class Model:
    """EmbBERT-Q classifier. ``classify_logits(ids)`` -> (n_labels,) float32 logits."""

    capabilities = Capabilities(classify=True, backends=("numba", "numpy"), accounting=True)

    def __init__(self, args: ModelArgs, weights: SimpleNamespace, backend: str = "numba"):
        self.args = a = args
        w = weights
        if len(w.blk) != a.n_layer:
            raise ValueError(f"embbert: model has {len(w.blk)} layers, metadata says {a.n_layer}")
        if a.n_inner % a.n_embd:
            raise ValueError(f"embbert: feed_forward_length {a.n_inner} is not a multiple of "
                             f"embedding_length {a.n_embd}")
        for name in ("token_embd", "position_embd", "token_types", "cls"):
            if not hasattr(w, name):
                raise ValueError(f"embbert: model lacks tensor {name}")
        if w.token_embd.qtype == "I8" or w.position_embd.qtype == "I8":
            raise ValueError("embbert: int8 embedding tables are not supported (use F16/F32)")
        d, r = a.n_embd, w.token_embd.cols
        self.tok_embd, self.pos_embd = w.token_embd, w.position_embd
        if w.position_embd.shape != (a.n_ctx, r):
            raise ValueError(f"embbert: position_embd has shape {w.position_embd.shape}, "
                             f"expected ({a.n_ctx}, {r})")
        self.tok_proj = _linear(w, "token_embd_proj", d, r, bias=False)
        self.pos_proj = _linear(w, "position_embd_proj", d, r, bias=False)
        self.seg = np.ascontiguousarray(w.token_types.dequantize(), F)   # (3, d)
        if self.seg.shape != (3, d):
            raise ValueError(f"embbert: token_types has shape {self.seg.shape}, expected (3, {d})")
        n_cls = w.cls.rows
        self.head = _linear(w, "cls", n_cls, d)
        if a.labels and len(a.labels) != n_cls:
            raise ValueError(f"embbert: {len(a.labels)} labels for a head of {n_cls} outputs")
        self.labels = a.labels or tuple(str(i) for i in range(n_cls))
        self.layers = []
        for i, b in enumerate(w.blk):
            conv = b.conv.dequantize() if hasattr(b, "conv") else None
            if conv is None or conv.shape != (a.n_inner, a.conv_kernel):
                raise ValueError(f"embbert: blk.{i}.conv must have shape "
                                 f"({a.n_inner}, {a.conv_kernel})")
            lam = {k: _vector(getattr(b, f"lambda_{k}"), d, f"blk.{i}.lambda_{k}")
                   for k in ("q1", "k1", "q2", "k2")}
            self.layers.append(SimpleNamespace(
                norm=_vector(b.attn_norm, d, f"blk.{i}.attn_norm"),
                q=_linear(b, "attn_q", d, d), o=_linear(b, "attn_output", d, d),
                conv_t=np.ascontiguousarray(conv.T, F),                     # (K, C)
                conv_b=_vector(b.conv_b, a.n_inner, f"blk.{i}.conv.bias"),
                conv_out=_linear(b, "conv_out", d, a.n_inner),
                # mixing weights are constants of the checkpoint: computed once, in f64
                lam1=F(np.exp(np.dot(lam["q1"].astype(np.float64), lam["k1"]))),
                lam2=F(np.exp(np.dot(lam["q2"].astype(np.float64), lam["k2"])))))
        self.set_backend(backend)

    def set_backend(self, backend: str) -> None:
        """"numba" (compiled kernels) or "numpy" (no JIT at all)."""
        self.ops = nn.backend_ops(backend)

    def activation_values(self, n_tokens: int) -> int:
        """Peak live activation values as the paper counts them: the x/Q buffer, the score
        matrix and the conv buffer, T·d + T² + T·d_inner."""
        a = self.args
        return n_tokens * a.n_embd + n_tokens * n_tokens + n_tokens * a.n_inner

    def _lin(self, p: SimpleNamespace, x: np.ndarray) -> np.ndarray:
        if p.wq is not None:
            return self.ops.linear_i8(x, p.wq, p.ws, p.b)
        return self.ops.linear_f32(x, p.w, p.b)

    def segments(self, ids: np.ndarray) -> np.ndarray:
        """Segment ids: 0 on padding, 1 before the first separator, 2 from it on."""
        a = self.args
        after = np.cumsum(ids == a.sep_id) > 0
        return np.where(ids == a.pad_id, 0, np.where(after, 2, 1))

    def classify_logits(self, ids) -> np.ndarray:
        """Logits (n_labels,) float32 of one sequence of token ids (1 <= T <= n_ctx)."""
        a, o = self.args, self.ops
        ids = np.asarray(ids, np.int64)
        T = len(ids)
        if T == 0 or T > a.n_ctx:
            raise ValueError(f"embbert: input has {T} tokens, the model takes 1..{a.n_ctx}")
        bad = ids[(ids < 0) | (ids >= self.tok_embd.rows)]
        if len(bad):
            raise ValueError(f"embbert: token id {int(bad[0])} is outside the vocabulary "
                             f"of {self.tok_embd.rows}")
        valid = ids != a.pad_id                                             # (T,) key mask
        x = (self._lin(self.tok_proj, o.embed(self.tok_embd, ids))
             + self._lin(self.pos_proj, o.embed(self.pos_embd, np.arange(T)))
             + self.seg[self.segments(ids)])                               # (T, d)
        scale = F(1.0 / np.sqrt(a.n_embd))
        for i, L in enumerate(self.layers):
            n_q = 1 if i == a.n_layer - 1 else T   # the head reads only position 0
            z = o.rms_norm(x, L.norm, a.eps)                                # (T, d)
            keys = z[valid]                                                 # (T_valid, d)
            q = self._lin(L.q, z[:n_q])                                     # (n_q, d)
            if len(keys):
                att = o.softmax(np.ascontiguousarray(q @ keys.T) * scale) @ keys   # (n_q, d)
                att[~valid[:n_q]] = 0   # padding query rows see no key: torch's NaN -> 0
            else:
                att = np.zeros((n_q, a.n_embd), F)
            a1 = self._lin(L.o, att)                                        # (n_q, d)
            a2 = self._lin(L.conv_out, o.conv_silu(z, L.conv_t, L.conv_b, n_q))   # (n_q, d)
            x = L.lam1 * a1 - L.lam2 * a2
        return self._lin(self.head, x[:1])[0]
