"""`minicpm` architecture: MiniCPM 1B/2B, MiniCPM-MoE-8x2B, MiniCPM4 (LongRoPE).

A llama-shaped decoder with muP scalings, computed as llama.cpp's Granite graph does: the
embeddings are multiplied by ``embedding_scale``, both residual branches by ``residual_scale``,
and the logits divided by ``logit_scale``. Keys missing from the file take llama.cpp's
defaults (12, 1.4/sqrt(n_layer), 256/n_embd). That logit default divides by 256/n_embd where
the original model divides by n_embd/256; it is kept for parity with llama.cpp, with a warning.
The converter permutes q/k for interleaved (NORM) RoPE. MiniCPM4's LongRoPE stores global
frequency-factor tensors; as in llama.cpp the long list is used when the configured context
exceeds the original one, and no magnitude factor is applied. A model with experts
(``expert_count`` > 0) routes with softmax, top-k and renormalisation, through pocketlm.nn.moe.

InfLLM v2 block-sparse attention (MiniCPM4) is opt-in at load time (``configure``); its
parameters come from ``minicpm.sparse.*`` keys when present, else MiniCPM4's defaults.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, fields, replace

import numpy as np

from pocketlm.models.base import (BaseModel, Capabilities, DecoderArgs, check_decoder,
                                  check_experts, check_rope_scaling, derived, expect_that, key,
                                  rope_factors, rope_freq_scale, rope_scaling)
from pocketlm.nn import moe
from pocketlm.nn import CompressedKeys, SparseConfig

SPARSE_MODES = ("auto", "on", "off")


def _default_logit_scale(a) -> float:
    warnings.warn("GGUF has no minicpm.logit_scale; dividing logits by 256/n_embd as "
                  "llama.cpp does (the original model divides by n_embd/256)", stacklevel=3)
    return 256.0 / a.n_embd


def _logit_scale(v) -> float:
    if not v:
        raise ValueError("minicpm.logit_scale must be non-zero")
    return float(v)


@dataclass(frozen=True)
class ModelArgs(DecoderArgs):
    rope_dims: int = key("rope.dimension_count", default="head_dim")
    n_ff: int = key("feed_forward_length")
    n_ctx_train: int = key("context_length", default=4096)
    n_ctx_orig: int = derived(
        lambda a: a.get("rope.scaling.original_context_length", 0) or a.n_ctx_train)
    rms_eps: float = key("attention.layer_norm_rms_epsilon", min=1e-20, max=1.0)
    rope_base: float = key("rope.freq_base", default=10000.0, min=1.0)
    rope_scaling: str = derived(rope_scaling)
    rope_freq_scale: float = derived(rope_freq_scale)
    rope_attn_factor: float = key("rope.scaling.attn_factor", default=1.0)
    longrope: bool = derived(lambda a: a.rope_scaling == "longrope")
    embedding_scale: float = key("embedding_scale", default=12.0)
    residual_scale: float = key("residual_scale", default=lambda a: 1.4 / np.sqrt(a.n_layer))
    logit_scale: float = key("logit_scale", default=_default_logit_scale, convert=_logit_scale)
    n_expert: int = key("expert_count", default=0)
    n_expert_used: int = key("expert_used_count", default=0)
    # MiniCPM-MoE routes with softmax, top-k, renormalised (none for the dense models)
    routing: moe.Routing | None = derived(
        lambda a: moe.Routing(a.n_expert_used, "softmax") if a.n_expert else None)
    sparse: SparseConfig = derived(lambda a: SparseConfig(**{
        f.name: int(a.get(f"sparse.{f.name}", f.default)) for f in fields(SparseConfig)}))

    def __post_init__(self):
        expect_that(self.rope_dims == self.head_dim, self.key_name("rope.dimension_count"),
                    self.rope_dims, f"the head size {self.head_dim}")

    def check(self, w) -> None:
        e, ff = self.n_embd, self.n_ff
        check_rope_scaling(self, "none", "linear", "longrope")
        ffn = check_experts(self, w, ff) if self.n_expert else \
            dict(ffn_gate=(ff, e), ffn_up=(ff, e), ffn_down=(e, ff))
        check_decoder(self, w, self.rope_dims, ffn_norm=(e,), **ffn)


_DENSE = Capabilities(generate=True, sparse_attention=True, devices=("cpu", "cuda"))


class Model(BaseModel):
    @property
    def capabilities(self) -> Capabilities:
        """Routed experts only when the file has them (MiniCPM-MoE)."""
        return replace(_DENSE, moe=True) if self.args.n_expert else _DENSE

    def __init__(self, args: ModelArgs, weights, experts=None):
        super().__init__(args, weights)
        self.scale = 1.0 / np.sqrt(args.head_dim)
        for L in weights.blk:
            extra = sorted(k for k in vars(L) if k.endswith("_b") or k == "attn_qkv")
            if extra:
                raise ValueError(f"minicpm: unsupported tensors {', '.join(extra)} "
                                 "(biases, fused qkv)")
        self.routers = self.experts = None
        if args.n_expert:
            if not all(hasattr(L, "ffn_gate_exps") for L in weights.blk):
                raise ValueError("minicpm: MoE model lacks stacked ffn_{gate,up,down}_exps "
                                 "tensors (split per-expert tensors are not supported)")
            self.routers = moe.Routers(tuple(L.ffn_gate_inp for L in weights.blk),
                                       args.routing)
            self.experts = experts or moe.ResidentExperts(
                [(L.ffn_gate_exps, L.ffn_up_exps, L.ffn_down_exps) for L in weights.blk])
        for name in ("rope_factors_long", "rope_factors_short", "rope_freqs"):
            rope_factors(weights, name, args.head_dim)
        if args.longrope and (getattr(weights, "rope_factors_long", None) is None
                              or getattr(weights, "rope_factors_short", None) is None):
            raise ValueError("minicpm: LongRoPE model lacks rope_factors_long/short tensors")
        self.sparse: SparseConfig | None = None
        self.configure()

    def required_tensors(self) -> tuple[str, ...]:
        ffn = ("ffn_gate_inp", "ffn_up_exps", "ffn_down_exps") if self.args.n_expert else \
            ("ffn_gate", "ffn_up", "ffn_down")
        return ("token_embd", "output_norm", "attn_norm", "attn_q", "attn_k", "attn_v",
                "attn_output", "ffn_norm") + ffn

    def configure(self, n_ctx: int | None = None, sparse_attention: str = "auto"):
        """Settings that depend on how the model is run.

        ``n_ctx``: the configured context (llama.cpp's n_ctx_seq; default the training
        context), which picks LongRoPE's long factors when it exceeds the original context.
        ``sparse_attention``: "auto" (InfLLM v2 from the switch length on), "on" (at every
        length) or "off" (always dense).
        """
        if sparse_attention not in SPARSE_MODES:
            raise ValueError(f"sparse attention {sparse_attention!r}: expected one of "
                             f"{', '.join(SPARSE_MODES)}")
        a, W = self.args, self.w
        n_ctx = n_ctx or a.n_ctx_train
        if a.longrope:
            self.rope_factors = W.rope_factors_long if n_ctx > a.n_ctx_orig \
                else W.rope_factors_short
        else:
            self.rope_factors = getattr(W, "rope_freqs", None)
        if sparse_attention == "off":
            self.sparse = None
        elif sparse_attention == "on":
            self.sparse = SparseConfig(**{**vars(a.sparse), "dense_len": 0})
        else:
            self.sparse = a.sparse

    def layer_windows(self) -> list[int]:
        return [0] * self.args.n_layer

    def new_cache(self, n_ctx: int, chunk: int = 512):
        cache = super().new_cache(n_ctx, chunk)
        a = self.args
        # compressed keys for sparse attention, per layer (filled only once it is used)
        cache.compressed = [CompressedKeys(a.n_head_kv, a.head_dim, n_ctx, self.sparse)
                            for _ in range(a.n_layer)] if self.sparse else None
        return cache

    def _rope(self, ops, x, positions):
        a = self.args
        x = ops.rope(x, positions, a.head_dim, a.rope_base, "norm", a.rope_freq_scale,
                     freq_factors=self.rope_factors)
        if a.rope_attn_factor != 1.0:
            x *= np.float32(a.rope_attn_factor)   # ggml scales cos and sin by it
        return x

    def forward_hidden(self, ids: np.ndarray, positions: np.ndarray, cache, ops) -> np.ndarray:
        a, W = self.args, self.w
        n = len(ids)
        rs = np.float32(a.residual_scale)
        sparse = getattr(cache, "compressed", None) if self.sparse else None
        x = ops.embed(W.token_embd, ids)  # (n, n_embd)
        if a.embedding_scale:
            x *= np.float32(a.embedding_scale)
        for i, (L, c) in enumerate(zip(W.blk, cache.layers)):
            h = ops.rms_norm(x, L.attn_norm, a.rms_eps)
            q = ops.linear(L.attn_q, h).reshape(n, a.n_head, a.head_dim)
            k = ops.linear(L.attn_k, h).reshape(n, a.n_head_kv, a.head_dim)
            q, k = self._rope(ops, q, positions), self._rope(ops, k, positions)
            v = ops.linear(L.attn_v, h).reshape(n, a.n_head_kv, a.head_dim)
            if sparse is not None:
                o = ops.sparse_attention(q, k, v, c, positions, self.scale, sparse[i])
            else:
                o = ops.attention(q, k, v, c, positions, self.scale)
            o = ops.linear(L.attn_output, o)
            x = x + (o * rs if rs else o)
            h = ops.rms_norm(x, L.ffn_norm, a.rms_eps)
            if self.experts is not None:
                # routed after attention: the source predicts the next layer's experts from
                # this FFN input, as for llama's MoE
                sel, wts = self.routers.route(i, h, ops)
                self.experts.request(i, sel, h)
                f = moe.moe_ffn(ops, h, sel, wts, self.experts, i, "silu")
            else:
                f = ops.glu_ffn(h, L.ffn_gate, L.ffn_up, L.ffn_down, "silu")
            x = x + (f * rs if rs else f)
        return ops.rms_norm(x, W.output_norm, a.rms_eps)

    def logits(self, hidden: np.ndarray, ops) -> np.ndarray:
        return super().logits(hidden, ops) / np.float32(self.args.logit_scale)
