"""`llama` architecture: SmolLM2, Llama 2/3 and any llama-arch GGUF (GQA, tied or separate head)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pocketlm.models.base import BaseModel, meta_get, rope_linear_scale
from pocketlm import nn


@dataclass(frozen=True)
class ModelArgs:
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_ctx_train: int
    rms_eps: float
    rope_base: float
    rope_dims: int
    rope_freq_scale: float
    n_vocab: int

    @classmethod
    def from_gguf(cls, meta: dict) -> "ModelArgs":
        g = meta_get(meta)
        n_embd = g("embedding_length")
        n_head = g("attention.head_count")
        head_dim = g("attention.key_length", n_embd // n_head)
        return cls(
            n_embd=n_embd, n_layer=g("block_count"), n_head=n_head,
            n_head_kv=g("attention.head_count_kv", n_head), head_dim=head_dim,
            n_ff=g("feed_forward_length"), n_ctx_train=g("context_length", 2048),
            rms_eps=g("attention.layer_norm_rms_epsilon", 1e-5),
            rope_base=g("rope.freq_base", 10000.0), rope_dims=g("rope.dimension_count", head_dim),
            rope_freq_scale=rope_linear_scale(g),
            n_vocab=len(meta["tokenizer.ggml.tokens"]),
        )


class Model(BaseModel):
    def __init__(self, args: ModelArgs, weights):
        super().__init__(args, weights)
        self.scale = 1.0 / np.sqrt(args.head_dim)

    def layer_windows(self) -> list[int]:
        return [0] * self.args.n_layer

    def forward_hidden(self, ids: np.ndarray, positions: np.ndarray, cache) -> np.ndarray:
        a, W = self.args, self.w
        n = len(ids)
        x = nn.embed(W.token_embd, ids)  # (n, n_embd)
        for i, (L, c) in enumerate(zip(W.blk, cache.layers)):
            h = nn.rms_norm(x, L.attn_norm, a.rms_eps)
            q, k, v = nn.linears([L.attn_q, L.attn_k, L.attn_v], h)
            q = q.reshape(n, a.n_head, a.head_dim)
            k = k.reshape(n, a.n_head_kv, a.head_dim)
            v = v.reshape(n, a.n_head_kv, a.head_dim)
            q = nn.rope(q, positions, a.rope_dims, a.rope_base, "norm", a.rope_freq_scale)
            k = nn.rope(k, positions, a.rope_dims, a.rope_base, "norm", a.rope_freq_scale)
            o = nn.attention(q, k, v, c, positions, self.scale)
            x = x + nn.linear(L.attn_output, o)
            h = nn.rms_norm(x, L.ffn_norm, a.rms_eps)
            x = x + nn.glu_ffn(h, L.ffn_gate, L.ffn_up, L.ffn_down, "silu")
        return nn.rms_norm(x, W.output_norm, a.rms_eps)
