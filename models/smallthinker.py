"""`smallthinker` architecture (PowerInfer SmallThinker): MoE in every layer, routed by a
pre-attention router that reads the raw layer input, ReGLU experts, NEOX RoPE.

With `smallthinker.attention.sliding_window` present, llama.cpp's fixed 21B layout applies:
every 4th layer from 0 is global attention without positional encoding (NoPE), the others use
RoPE and a 4096-token sliding window (the window in the file is ignored, as llama.cpp does).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from pocketlm.models.base import BaseModel, meta_get, swa_layers
from pocketlm.nn import moe
from pocketlm import nn

SWA_WINDOW = 4096
NOPE_STEP = 4


@dataclass(frozen=True)
class ModelArgs:
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff_exp: int
    n_expert: int
    n_expert_used: int
    gating: int
    rms_eps: float
    rope_base: float
    rope_base_swa: float
    is_swa: tuple[bool, ...]
    use_rope: tuple[bool, ...]
    n_vocab: int

    @classmethod
    def from_gguf(cls, meta: dict) -> "ModelArgs":
        g = meta_get(meta)
        n_layer = g("block_count")
        n_embd = g("embedding_length")
        n_head = g("attention.head_count")
        window = g("attention.sliding_window", 0)
        if window and window > 0:
            is_swa = swa_layers(g("attention.sliding_window_pattern", 4), n_layer, True)
            use_rope = tuple(i % NOPE_STEP != 0 for i in range(n_layer))
        else:
            is_swa = (False,) * n_layer
            use_rope = (True,) * n_layer
        gating = g("expert_gating_func", None)
        if gating is None:
            warnings.warn("GGUF has no smallthinker.expert_gating_func; assuming sigmoid gating",
                          stacklevel=2)
            gating = moe.GATING_SIGMOID
        base = g("rope.freq_base", 10000.0)
        return cls(
            n_embd=n_embd, n_layer=n_layer, n_head=n_head,
            n_head_kv=g("attention.head_count_kv", n_head),
            head_dim=g("attention.key_length", n_embd // n_head),
            n_ff_exp=g("expert_feed_forward_length", g("feed_forward_length", 0)),
            n_expert=g("expert_count"), n_expert_used=g("expert_used_count"), gating=int(gating),
            rms_eps=g("attention.layer_norm_rms_epsilon", 1e-6), rope_base=base,
            rope_base_swa=g("rope.freq_base_swa", base), is_swa=is_swa, use_rope=use_rope,
            n_vocab=len(meta["tokenizer.ggml.tokens"]),
        )


class Model(BaseModel):
    def __init__(self, args: ModelArgs, weights, experts=None):
        super().__init__(args, weights)
        self.scale = 1.0 / np.sqrt(args.head_dim)
        self.experts = experts or moe.ResidentExperts(
            [(L.ffn_gate_exps, L.ffn_up_exps, L.ffn_down_exps) for L in weights.blk])
        # observer of routing decisions, on_route(layer, ids (n, k)): routing statistics, traces
        self.on_route = None
        # replacement of routing decisions, route_override(layer, ids, weights) -> (ids,
        # weights): benchmarks' worst case (uniform random experts)
        self.route_override = None

    def layer_windows(self) -> list[int]:
        return [SWA_WINDOW if s else 0 for s in self.args.is_swa]

    def forward_hidden(self, ids: np.ndarray, positions: np.ndarray, cache) -> np.ndarray:
        a, W = self.args, self.w
        n = len(ids)
        x = nn.embed(W.token_embd, ids)  # (n, n_embd)
        for i, (L, c) in enumerate(zip(W.blk, cache.layers)):
            # the router reads the layer input, so the experts are known before attention
            sel, wts = moe.route(nn.linear(L.ffn_gate_inp, x), a.n_expert_used, a.gating)
            if self.route_override is not None:
                sel, wts = self.route_override(i, sel, wts)
            if self.on_route is not None:
                self.on_route(i, sel)
            ex = self.experts
            ex.request(i, sel)   # a streaming source reads them while attention computes
            if ex.wants_hints and i + 1 < a.n_layer:
                # the next router on this input predicts the next layer's experts well,
                # because the residual stream changes little from one layer to the next
                nxt = self.w.blk[i + 1].ffn_gate_inp
                ex.hint(i + 1, moe.route(nn.linear(nxt, x), a.n_expert_used, a.gating)[0])
            h = nn.rms_norm(x, L.attn_norm, a.rms_eps)
            q, k, v = nn.linears([L.attn_q, L.attn_k, L.attn_v], h)
            q = q.reshape(n, a.n_head, a.head_dim)
            k = k.reshape(n, a.n_head_kv, a.head_dim)
            v = v.reshape(n, a.n_head_kv, a.head_dim)
            if a.use_rope[i]:
                base = a.rope_base_swa if a.is_swa[i] else a.rope_base
                q = nn.rope(q, positions, a.head_dim, base, "neox")
                k = nn.rope(k, positions, a.head_dim, base, "neox")
            o = nn.attention(q, k, v, c, positions, self.scale)
            x = x + nn.linear(L.attn_output, o)
            h = nn.rms_norm(x, L.ffn_norm, a.rms_eps)
            x = x + moe.moe_ffn(h, sel, wts, self.experts, i, "relu")
        return nn.rms_norm(x, W.output_norm, a.rms_eps)
