"""`llama` architecture: SmolLM2, Llama 2/3, Mixtral-style MoE (``llama.expert_count``) and any
llama-arch GGUF (GQA, tied or separate head, the optional q/k/v/output biases llama.cpp's graph
takes).

The decoder here is also the block the llama-shaped MoE architectures (qwen2moe, qwen3moe,
olmoe, granitemoe, gpt-oss) subclass: they differ only in RoPE pairing, q/k norms, routing, a
shared expert, muP multipliers, expert biases and activation, each set by a class attribute or
an args field, and gpt-oss in its attention (``_attend``). RoPE follows the file's scaling
for all of them: linear, YaRN, and Llama 3's per-pair factors (``rope_freqs``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from pocketlm import nn
from pocketlm.models.base import (BaseModel, Capabilities, DecoderArgs, check_decoder,
                                  check_experts, check_rope_scaling, derived, key, rope_factors,
                                  rope_freq_scale, rope_scaling, rope_yarn)
from pocketlm.nn import moe


def routing(renorm: bool):
    """A ModelArgs field: softmax over all experts, top-k, renormalised or not (llama.cpp's
    ``norm_w`` for the architecture); None for a dense model."""
    return derived(lambda a: moe.Routing(a.n_expert_used, "softmax", renorm)
                   if a.n_expert else None)


@dataclass(frozen=True)
class ModelArgs(DecoderArgs):
    n_ff: int = key("feed_forward_length")
    n_ctx_train: int = key("context_length", default=2048)
    rms_eps: float = key("attention.layer_norm_rms_epsilon", default=1e-5, min=1e-20, max=1.0)
    rope_base: float = key("rope.freq_base", default=10000.0, min=1.0)
    rope_dims: int = key("rope.dimension_count", default="head_dim")
    rope_scaling: str = derived(rope_scaling)
    rope_freq_scale: float = derived(rope_freq_scale)
    yarn: nn.YaRN | None = derived(rope_yarn)
    n_expert: int = key("expert_count", default=0)
    n_expert_used: int = key("expert_used_count", default=0)
    # one expert's FFN width: Mixtral's experts are feed_forward_length wide
    n_ff_exp: int = key("expert_feed_forward_length", default="n_ff")
    # shared-expert width (0: none; llama's graph has none, qwen2moe's always has one)
    n_ff_shexp: int = derived(lambda a: 0)
    routing: moe.Routing | None = routing(renorm=True)

    def check(self, w) -> None:
        e = self.n_embd
        check_rope_scaling(self, "none", "linear", "yarn")
        check_decoder(self, w, self.rope_dims, ffn_norm=(e,), **self.ffn_shapes(w),
                      **self.qk_norm_shapes())

    def ffn_shapes(self, w) -> dict:
        """Per-layer FFN tensor shapes: dense, or routed experts plus any shared expert."""
        e, ff = self.n_embd, self.n_ff
        if not self.n_expert:
            return dict(ffn_gate=(ff, e), ffn_up=(ff, e), ffn_down=(e, ff))
        shapes = check_experts(self, w, self.n_ff_exp)
        if self.n_ff_shexp:
            s = self.n_ff_shexp
            shapes.update(ffn_gate_shexp=(s, e), ffn_up_shexp=(s, e), ffn_down_shexp=(e, s))
            if self.shexp_gate:
                shapes.update(ffn_gate_inp_shexp=(e,))
        return shapes

    shexp_gate = False   # the shared expert has a sigmoid gate ffn_gate_inp_shexp (qwen2moe)

    def qk_norm_shapes(self) -> dict:
        """Shapes of the q/k norms an architecture has (none for llama)."""
        return {}


class Model(BaseModel):
    rope_mode = "norm"   # adjacent pairs, as llama.cpp's LLAMA_ROPE_TYPE_NORM
    qk_norm = None       # "head": RMSNorm per head (qwen3moe); "full": over all heads (olmoe)
    ffn_norm = "ffn_norm"   # the layer's norm before the FFN, by tensor name
    expert_act = "silu"     # the experts' GLU activation (``Ops.glu``)

    @property
    def capabilities(self) -> Capabilities:
        """Routed experts only when the file has them; the GPU path runs dense models only,
        and only with plain or linear RoPE (it has no YaRN or frequency-factor kernel)."""
        if self.args.n_expert:
            return Capabilities(generate=True, moe=True, devices=("cpu",))
        if self.args.yarn is not None or self.rope_factors is not None:
            return Capabilities(generate=True, devices=("cpu",))
        return Capabilities(generate=True, devices=("cpu", "cuda"))

    def __init__(self, args: ModelArgs, weights, experts=None):
        super().__init__(args, weights)
        self.scale = 1.0 / np.sqrt(args.head_dim)
        # per-pair frequency divisors (Llama 3's rope scaling), as llama.cpp's graph takes them
        self.rope_factors = rope_factors(weights, "rope_freqs", args.rope_dims)
        # muP multipliers (granite): 0 leaves the embeddings and residual branches unscaled
        self.embedding_scale = self.residual_scale = 0.0
        # per layer: biases of q, k, v (None each, or all None) and of the attention output
        self.biases = []
        for L in weights.blk:
            qkv = tuple(vars(L).get(n) for n in ("attn_q_b", "attn_k_b", "attn_v_b"))
            self.biases.append((None if all(b is None for b in qkv) else qkv,
                                vars(L).get("attn_output_b")))
        self.routers = self.experts = None
        # per layer: the experts' (gate, up, down) biases, or None (gpt-oss has them)
        self.expert_biases = [None] * args.n_layer
        if args.n_expert:
            if not all(hasattr(L, "ffn_gate_exps") for L in weights.blk):
                raise ValueError(f"{args.arch}: MoE model lacks stacked ffn_gate_exps tensors "
                                 "(split per-expert tensors are not supported)")
            self.routers = moe.Routers(tuple(L.ffn_gate_inp for L in weights.blk),
                                       args.routing)
            self.experts = experts or moe.ResidentExperts(
                [(L.ffn_gate_exps, L.ffn_up_exps, L.ffn_down_exps) for L in weights.blk])

    def layer_windows(self) -> list[int]:
        return [0] * self.args.n_layer

    def _norm_qk(self, ops, L, q, k):
        a = self.args
        if self.qk_norm == "head":
            return ops.head_norm(q, L.attn_q_norm, a.rms_eps), \
                ops.head_norm(k, L.attn_k_norm, a.rms_eps)
        if self.qk_norm == "full":
            n = len(q)
            return (ops.rms_norm(q.reshape(n, -1), L.attn_q_norm, a.rms_eps).reshape(q.shape),
                    ops.rms_norm(k.reshape(n, -1), L.attn_k_norm, a.rms_eps).reshape(k.shape))
        return q, k

    def _rope(self, ops, t, positions):
        a = self.args
        return ops.rope(t, positions, a.rope_dims, a.rope_base, self.rope_mode, a.rope_freq_scale,
                        freq_factors=self.rope_factors, yarn=a.yarn)

    def _attend(self, ops, L, q, k, v, cache, positions):
        return ops.attention(q, k, v, cache, positions, self.scale)

    def _ffn(self, ops, i: int, L, h):
        if self.experts is None:
            return ops.glu_ffn(h, L.ffn_gate, L.ffn_up, L.ffn_down, "silu")
        sel, wts = self.routers.route(i, h, ops)
        # the router reads the FFN input, known only after attention: the source reads these
        # experts now and predicts the next layer's from the same input (speculatively)
        self.experts.request(i, sel, h)
        f = moe.moe_ffn(ops, h, sel, wts, self.experts, i, self.expert_act,
                        self.expert_biases[i])
        if self.args.n_ff_shexp:
            s = ops.glu_ffn(h, L.ffn_gate_shexp, L.ffn_up_shexp, L.ffn_down_shexp, "silu")
            if self.args.shexp_gate:   # scaled by sigmoid(ffn_gate_inp_shexp·x)
                g = h @ L.ffn_gate_inp_shexp                                  # (n,)
                s *= (1.0 / (1.0 + np.exp(-g)))[:, None].astype(np.float32)
            f += s
        return f

    def forward_hidden(self, ids: np.ndarray, positions: np.ndarray, cache, ops) -> np.ndarray:
        a, W = self.args, self.w
        n = len(ids)
        es, rs = np.float32(self.embedding_scale), np.float32(self.residual_scale)
        x = ops.embed(W.token_embd, ids)  # (n, n_embd)
        if es:
            x *= es
        for i, (L, c) in enumerate(zip(W.blk, cache.layers)):
            qkv_b, out_b = self.biases[i]
            h = ops.rms_norm(x, L.attn_norm, a.rms_eps)
            q, k, v = ops.linears([L.attn_q, L.attn_k, L.attn_v], h, qkv_b)
            q = q.reshape(n, a.n_head, a.head_dim)
            k = k.reshape(n, a.n_head_kv, a.head_dim)
            v = v.reshape(n, a.n_head_kv, a.head_dim)
            q, k = self._norm_qk(ops, L, q, k)
            q, k = self._rope(ops, q, positions), self._rope(ops, k, positions)
            o = ops.linear(L.attn_output, self._attend(ops, L, q, k, v, c, positions), out_b)
            x = x + (o * rs if rs else o)
            f = self._ffn(ops, i, L, ops.rms_norm(x, getattr(L, self.ffn_norm), a.rms_eps))
            x = x + (f * rs if rs else f)
        return ops.rms_norm(x, W.output_norm, a.rms_eps)
