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

from pocketlm.models.base import (BaseModel, Capabilities, DecoderArgs, check_decoder,
                                  check_experts, check_rope_scaling, derived, expect_that, key,
                                  rope_freq_scale, rope_scaling, swa_layers)
from pocketlm.nn import moe

SWA_WINDOW = 4096
NOPE_STEP = 4


def _routing(a) -> moe.Routing:
    func = a.get("expert_gating_func", None)
    if func is None:
        warnings.warn("GGUF has no smallthinker.expert_gating_func; assuming sigmoid gating",
                      stacklevel=3)
        return moe.Routing(a.n_expert_used, "sigmoid")
    expect_that(func in moe.GGUF_GATING, a.full("expert_gating_func"), func,
                "1 (softmax) or 2 (sigmoid)")
    return moe.Routing(a.n_expert_used, moe.GGUF_GATING[func])


@dataclass(frozen=True)
class ModelArgs(DecoderArgs):
    n_ff_exp: int = key("expert_feed_forward_length",
                        default=lambda a: a.get("feed_forward_length", 0))
    n_expert: int = key("expert_count")
    n_expert_used: int = key("expert_used_count")
    routing: moe.Routing = derived(_routing)
    rms_eps: float = key("attention.layer_norm_rms_epsilon", default=1e-6, min=1e-20, max=1.0)
    rope_base: float = key("rope.freq_base", default=10000.0, min=1.0)
    rope_base_swa: float = key("rope.freq_base_swa", default="rope_base", min=1.0)
    rope_scaling: str = derived(rope_scaling)
    rope_freq_scale: float = derived(rope_freq_scale)
    # the sliding-window key switches on the 21B layout (the window itself is fixed)
    layout_21b: bool = key("attention.sliding_window", default=0, convert=lambda v: v > 0)
    is_swa: tuple[bool, ...] = derived(lambda a: swa_layers(
        a.get("attention.sliding_window_pattern", 4), a.n_layer, True)
        if a.layout_21b else (False,) * a.n_layer)
    use_rope: tuple[bool, ...] = derived(lambda a: tuple(
        i % NOPE_STEP != 0 for i in range(a.n_layer)) if a.layout_21b else (True,) * a.n_layer)

    def check(self, w) -> None:
        check_rope_scaling(self, "none", "linear")
        check_decoder(self, w, self.head_dim, ffn_norm=(self.n_embd,),
                      **check_experts(self, w, self.n_ff_exp))


class Model(BaseModel):
    capabilities = Capabilities(generate=True, moe=True, devices=("cpu", "cuda"))

    def __init__(self, args: ModelArgs, weights, experts=None):
        super().__init__(args, weights)
        self.scale = 1.0 / np.sqrt(args.head_dim)
        self.routers = moe.Routers(tuple(L.ffn_gate_inp for L in weights.blk), args.routing)
        self.experts = experts or moe.ResidentExperts(
            [(L.ffn_gate_exps, L.ffn_up_exps, L.ffn_down_exps) for L in weights.blk])

    def layer_windows(self) -> list[int]:
        return [SWA_WINDOW if s else 0 for s in self.args.is_swa]

    def forward_hidden(self, ids: np.ndarray, positions: np.ndarray, cache, ops) -> np.ndarray:
        a, W = self.args, self.w
        n = len(ids)
        x = ops.embed(W.token_embd, ids)  # (n, n_embd)
        for i, (L, c) in enumerate(zip(W.blk, cache.layers)):
            # the router reads the layer input, so the experts are known before attention: a
            # streaming source reads them while attention computes, and predicts the next
            # layer's from the same input
            sel, wts = self.routers.route(i, x, ops)
            self.experts.request(i, sel, x)
            h = ops.rms_norm(x, L.attn_norm, a.rms_eps)
            q, k, v = ops.linears([L.attn_q, L.attn_k, L.attn_v], h)
            q = q.reshape(n, a.n_head, a.head_dim)
            k = k.reshape(n, a.n_head_kv, a.head_dim)
            v = v.reshape(n, a.n_head_kv, a.head_dim)
            if a.use_rope[i]:
                base = a.rope_base_swa if a.is_swa[i] else a.rope_base
                q = ops.rope(q, positions, a.head_dim, base, "neox", a.rope_freq_scale)
                k = ops.rope(k, positions, a.head_dim, base, "neox", a.rope_freq_scale)
            o = ops.attention(q, k, v, c, positions, self.scale)
            x = x + ops.linear(L.attn_output, o)
            h = ops.rms_norm(x, L.ffn_norm, a.rms_eps)
            x = x + moe.moe_ffn(ops, h, sel, wts, self.experts, i, "relu")
        return ops.rms_norm(x, W.output_norm, a.rms_eps)
