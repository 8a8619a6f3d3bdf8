"""`qwen2moe` architecture: Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B (llama.cpp's llm_build_qwen2moe).

Qwen2's blocks (q/k/v biases, NEOX RoPE); the FFN is the routed experts (softmax over all, top
k, not renormalised) plus a shared expert always run, scaled per token by
sigmoid(ffn_gate_inp_shexp · x).
"""
from __future__ import annotations

from dataclasses import dataclass

from pocketlm.models import llama, qwen2
from pocketlm.models.base import Capabilities, key
from pocketlm.models.qwen3moe import per_used_expert
from pocketlm.nn import moe


@dataclass(frozen=True)
class ModelArgs(qwen2.ModelArgs):
    n_expert: int = key("expert_count", min=1)
    n_expert_used: int = key("expert_used_count", min=1)
    n_ff_exp: int = key("expert_feed_forward_length", default=per_used_expert, min=1)
    n_ff_shexp: int = key("expert_shared_feed_forward_length", default="n_ff", min=1)
    routing: moe.Routing | None = llama.routing(renorm=False)
    shexp_gate = True


class Model(qwen2.Model):
    capabilities = Capabilities(generate=True, moe=True, devices=("cpu",))
