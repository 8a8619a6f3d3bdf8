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

from pocketlm.models import llama
from pocketlm.models.base import (check_decoder, check_experts, check_rope_scaling, derived,
                                  key, swa_layers)
from pocketlm.nn import moe


@dataclass(frozen=True)
class ModelArgs(llama.ModelArgs):
    n_expert: int = key("expert_count", min=1)
    n_expert_used: int = key("expert_used_count", min=1)
    n_ff_exp: int = key("expert_feed_forward_length", min=1)
    window: int = key("attention.sliding_window", min=1)
    is_swa: tuple[bool, ...] = derived(lambda a: swa_layers(
        a.get("attention.sliding_window_pattern", 2), a.n_layer, False))
    routing: moe.Routing | None = derived(
        lambda a: moe.Routing(a.n_expert_used, "softmax_weight", renorm=False))

    def check(self, w) -> None:
        e, H, E, ff = self.n_embd, self.n_head, self.n_expert, self.n_ff_exp
        check_rope_scaling(self, "none", "linear", "yarn")
        check_decoder(self, w, self.rope_dims, post_attention_norm=(e,), attn_sinks=(H,),
                      ffn_gate_inp_b=(E,), ffn_gate_exps_b=(E, ff), ffn_up_exps_b=(E, ff),
                      ffn_down_exps_b=(E, e), **check_experts(self, w, ff))


class Model(llama.Model):
    rope_mode = "neox"
    ffn_norm = "post_attention_norm"
    expert_act = "swiglu_oai"

    def __init__(self, args: ModelArgs, weights, experts=None):
        super().__init__(args, weights, experts)
        self.routers = moe.Routers(self.routers.weights, args.routing,
                                   biases=tuple(L.ffn_gate_inp_b for L in weights.blk))
        self.expert_biases = [tuple(getattr(L, f"ffn_{p}_exps_b").dequantize()
                                    for p in ("gate", "up", "down")) for L in weights.blk]

    def layer_windows(self) -> list[int]:
        return [self.args.window if s else 0 for s in self.args.is_swa]

    def _attend(self, ops, L, q, k, v, cache, positions):
        return ops.attention(q, k, v, cache, positions, self.scale, sinks=L.attn_sinks)
