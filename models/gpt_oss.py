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

    def _rope(self, ops, t, positions):
        a = self.args
        return ops.rope(t, positions, a.rope_dims, a.rope_base, "neox", a.rope_freq_scale,
                        yarn=a.yarn)

    def _attend(self, ops, L, q, k, v, cache, positions):
        return ops.attention(q, k, v, cache, positions, self.scale, sinks=L.attn_sinks)
