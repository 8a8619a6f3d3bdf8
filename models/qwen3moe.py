"""`qwen3moe` architecture: Qwen3-MoE (30B-A3B, 235B-A22B; llama.cpp's llm_build_qwen3moe).

Llama's blocks without biases, RMSNorm of each q and k head before NEOX RoPE, and an MoE FFN
in every layer: softmax over all experts, the top k renormalised to sum to 1.
"""
from __future__ import annotations

from dataclasses import dataclass

from pocketlm.models import llama
from pocketlm.models.base import expect_that, key


def per_used_expert(a) -> int:
    """llama.cpp's default expert width: the dense width split over the experts used."""
    return a.n_ff // a.n_expert_used


@dataclass(frozen=True)
class ModelArgs(llama.ModelArgs):
    n_expert: int = key("expert_count", min=1)
    n_expert_used: int = key("expert_used_count", min=1)
    n_ff_exp: int = key("expert_feed_forward_length", default=per_used_expert, min=1)

    def check(self, w) -> None:
        expect_that(self.rope_dims == self.head_dim, self.key_name("rope.dimension_count"),
                    self.rope_dims, f"the head size {self.head_dim}")
        super().check(w)

    def qk_norm_shapes(self) -> dict:
        return dict(attn_q_norm=(self.head_dim,), attn_k_norm=(self.head_dim,))


class Model(llama.Model):
    rope_mode = "neox"
    qk_norm = "head"
