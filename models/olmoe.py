"""`olmoe` architecture: OLMoE-1B-7B (llama.cpp's llm_build_olmoe).

Llama's blocks without biases; q and k are RMS-normalised over their full width (all heads at
once) before NEOX RoPE; an MoE FFN in every layer: softmax over all experts, top k, not
renormalised.
"""
from __future__ import annotations

from dataclasses import dataclass

from pocketlm.models import llama
from pocketlm.models.base import expect_that, key
from pocketlm.nn import moe


@dataclass(frozen=True)
class ModelArgs(llama.ModelArgs):
    n_expert: int = key("expert_count", min=1)
    n_expert_used: int = key("expert_used_count", min=1)
    routing: moe.Routing | None = llama.routing(renorm=False)

    def check(self, w) -> None:
        expect_that(self.rope_dims == self.head_dim, self.key_name("rope.dimension_count"),
                    self.rope_dims, f"the head size {self.head_dim}")
        # llama.cpp's k norm is n_embd wide, as q's: no grouped-query attention
        expect_that(self.n_head_kv == self.n_head, self.key_name("attention.head_count_kv"),
                    self.n_head_kv, f"attention.head_count {self.n_head}")
        super().check(w)

    def qk_norm_shapes(self) -> dict:
        q = self.n_head * self.head_dim
        return dict(attn_q_norm=(q,), attn_k_norm=(q,))


class Model(llama.Model):
    rope_mode = "neox"
    qk_norm = "full"
