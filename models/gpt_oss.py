"""`gpt-oss` architecture: gpt-oss-20b and -120b (llama.cpp's llama_model_openai_moe).

Llama-shaped blocks with q/k/v and output biases and NEOX RoPE under YaRN; attention sinks
(a learned logit per head that joins each softmax without a value); sliding-window and global
layers alternating (even layers slide); one norm before attention and one
(``post_attention_norm``) before the MoE FFN. The router has a bias; it picks the top k
logits and weights them by a softmax over those k. Experts (MXFP4 in the released files) have
biases on all three products and gpt-oss's clamped SwiGLU.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pocketlm import nn
from pocketlm.models import llama
from pocketlm.models.base import check_decoder, check_experts, derived, key, swa_layers
from pocketlm.nn import moe


def _freq_scale(a) -> float:
    """llama.cpp's rope_freq_scale_train: 1/rope.scaling.factor, whatever the scaling type."""
    factor = a.get("rope.scaling.factor", 0.0)
    return 1.0 / factor if factor else 1.0


def _yarn(a):
    if a.get("rope.scaling.type", "none") != "yarn":
        return None
    return nn.yarn(a.rope_dims, a.rope_base, a.rope_freq_scale,
                   a.get("rope.scaling.original_context_length", a.n_ctx_train),
                   rope_attn_factor=a.get("rope.scaling.attn_factor", 1.0))


@dataclass(frozen=True)
class ModelArgs(llama.ModelArgs):
    n_expert: int = key("expert_count", min=1)
    n_expert_used: int = key("expert_used_count", min=1)
    n_ff_exp: int = key("expert_feed_forward_length", min=1)
    rope_freq_scale: float = derived(_freq_scale)
    yarn: nn.YaRN | None = derived(_yarn)
    window: int = key("attention.sliding_window", min=1)
    is_swa: tuple[bool, ...] = derived(lambda a: swa_layers(
        a.get("attention.sliding_window_pattern", 2), a.n_layer, False))
    routing: moe.Routing | None = derived(
        lambda a: moe.Routing(a.n_expert_used, "softmax_weight", renorm=False))

    def check(self, w) -> None:
        e, H, E, ff = self.n_embd, self.n_head, self.n_expert, self.n_ff_exp
        check_decoder(self, w, self.rope_dims, post_attention_norm=(e,), attn_sinks=(H,),
                      ffn_gate_inp_b=(E,), ffn_gate_exps_b=(E, ff), ffn_up_exps_b=(E, ff),
                      ffn_down_exps_b=(E, e), **check_experts(self, w, ff))


class Model(llama.Model):
    rope_mode = "neox"

    def __init__(self, args: ModelArgs, weights, experts=None):
        super().__init__(args, weights, experts)
        self.routers = moe.Routers(self.routers.weights, args.routing,
                                   biases=tuple(L.ffn_gate_inp_b for L in weights.blk))
        # per layer: (gate, up, down) expert biases, (E, n_ff) (E, n_ff) (E, n_embd) float32
        self.expert_biases = [tuple(getattr(L, f"ffn_{p}_exps_b").dequantize()
                                    for p in ("gate", "up", "down")) for L in weights.blk]

    def layer_windows(self) -> list[int]:
        return [self.args.window if s else 0 for s in self.args.is_swa]

    def forward_hidden(self, ids: np.ndarray, positions: np.ndarray, cache, ops) -> np.ndarray:
        a, W = self.args, self.w
        n = len(ids)
        x = ops.embed(W.token_embd, ids)                                     # (n, n_embd)
        for i, (L, c) in enumerate(zip(W.blk, cache.layers)):
            qkv_b, out_b = self.biases[i]
            h = ops.rms_norm(x, L.attn_norm, a.rms_eps)
            q, k, v = ops.linears([L.attn_q, L.attn_k, L.attn_v], h, qkv_b)
            q = q.reshape(n, a.n_head, a.head_dim)
            k = k.reshape(n, a.n_head_kv, a.head_dim)
            v = v.reshape(n, a.n_head_kv, a.head_dim)
            q = ops.rope(q, positions, a.rope_dims, a.rope_base, "neox", a.rope_freq_scale,
                         yarn=a.yarn)
            k = ops.rope(k, positions, a.rope_dims, a.rope_base, "neox", a.rope_freq_scale,
                         yarn=a.yarn)
            att = ops.attention(q, k, v, c, positions, self.scale, sinks=L.attn_sinks)
            x = x + ops.linear(L.attn_output, att, out_b)
            h = ops.rms_norm(x, L.post_attention_norm, a.rms_eps)
            sel, wts = self.routers.route(i, h, ops)
            self.experts.request(i, sel, h)
            x = x + moe.moe_ffn(ops, h, sel, wts, self.experts, i, "swiglu_oai",
                                self.expert_biases[i])
        return ops.rms_norm(x, W.output_norm, a.rms_eps)
