"""`granitemoe` architecture: Granite 3.x MoE (1B-A400M, 3B-A800M; llama.cpp's llm_build_granite).

Llama's blocks (NORM RoPE) with Granite's multipliers: the embeddings times
``embedding_scale``, both residual branches times ``residual_scale`` (0 or absent: unscaled),
attention scores times ``attention.scale`` (absent: 1/sqrt(head_dim)) and the logits divided
by ``logit_scale``; an MoE FFN in every layer: softmax, top k, renormalised.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pocketlm.models import llama
from pocketlm.models.base import expect_that, key


def _nonzero(v) -> float:
    if not v:
        raise ValueError("must be non-zero")
    return float(v)


@dataclass(frozen=True)
class ModelArgs(llama.ModelArgs):
    n_expert: int = key("expert_count", min=1)
    n_expert_used: int = key("expert_used_count", min=1)
    embedding_scale: float = key("embedding_scale", default=0.0)
    residual_scale: float = key("residual_scale", default=0.0)
    attention_scale: float = key("attention.scale", default=0.0)
    logit_scale: float = key("logit_scale", convert=_nonzero)
    # llama.cpp's switch for RoPE (default on); Granite models without RoPE are not supported
    rope_finetuned: bool = key("rope.scaling.finetuned", default=True)

    def check(self, w) -> None:
        expect_that(self.rope_finetuned, self.key_name("rope.scaling.finetuned"),
                    self.rope_finetuned, "true (models without RoPE are not supported)")
        expect_that(self.rope_dims == self.head_dim, self.key_name("rope.dimension_count"),
                    self.rope_dims, f"the head size {self.head_dim}")
        super().check(w)


class Model(llama.Model):
    def __init__(self, args: ModelArgs, weights, experts=None):
        super().__init__(args, weights, experts)
        self.embedding_scale, self.residual_scale = args.embedding_scale, args.residual_scale
        if args.attention_scale:
            self.scale = args.attention_scale

    def logits(self, hidden: np.ndarray, ops) -> np.ndarray:
        return super().logits(hidden, ops) / np.float32(self.args.logit_scale)
