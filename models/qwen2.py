"""`qwen2` architecture: Qwen2 and Qwen2.5 (llama.cpp's llm_build_qwen2). Llama's blocks with
biases on q, k and v, NEOX RoPE over the whole head, a tied or separate head."""
from __future__ import annotations

from dataclasses import dataclass

from pocketlm.models import llama
from pocketlm.models.base import Capabilities, expect, expect_that


@dataclass(frozen=True)
class ModelArgs(llama.ModelArgs):
    def check(self, w) -> None:
        super().check(w)
        expect_that(self.rope_dims == self.head_dim, "rope.dimension_count", self.rope_dims,
                    f"the head size {self.head_dim}")
        q, kv = self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        for i in range(len(w.blk)):
            for name, n in (("attn_q_b", q), ("attn_k_b", kv), ("attn_v_b", kv)):
                expect(w, f"blk.{i}.{name}", n)


class Model(llama.Model):
    capabilities = Capabilities(generate=True, devices=("cpu",))
    rope_mode = "neox"   # pairs (i, i + d/2), as llama.cpp's LLAMA_ROPE_TYPE_NEOX for qwen2
