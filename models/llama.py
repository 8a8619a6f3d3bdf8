"""`llama` architecture: SmolLM2, Llama 2/3 and any llama-arch GGUF (GQA, tied or separate head,
the optional q/k/v/output biases llama.cpp's graph takes)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pocketlm.models.base import (BaseModel, Capabilities, DecoderArgs, check_decoder, derived,
                                  key, rope_linear_scale)


@dataclass(frozen=True)
class ModelArgs(DecoderArgs):
    n_ff: int = key("feed_forward_length")
    n_ctx_train: int = key("context_length", default=2048)
    rms_eps: float = key("attention.layer_norm_rms_epsilon", default=1e-5, min=1e-20, max=1.0)
    rope_base: float = key("rope.freq_base", default=10000.0, min=1.0)
    rope_dims: int = key("rope.dimension_count", default="head_dim")
    rope_freq_scale: float = derived(rope_linear_scale)

    def check(self, w) -> None:
        e, ff = self.n_embd, self.n_ff
        check_decoder(self, w, self.rope_dims, ffn_norm=(e,), ffn_gate=(ff, e), ffn_up=(ff, e),
                      ffn_down=(e, ff))


class Model(BaseModel):
    capabilities = Capabilities(generate=True, devices=("cpu", "cuda"))
    rope_mode = "norm"   # adjacent pairs, as llama.cpp's LLAMA_ROPE_TYPE_NORM

    def __init__(self, args: ModelArgs, weights):
        super().__init__(args, weights)
        self.scale = 1.0 / np.sqrt(args.head_dim)
        # per layer: biases of q, k, v (None each, or all None) and of the attention output
        self.biases = []
        for L in weights.blk:
            qkv = tuple(vars(L).get(n) for n in ("attn_q_b", "attn_k_b", "attn_v_b"))
            self.biases.append((None if all(b is None for b in qkv) else qkv,
                                vars(L).get("attn_output_b")))

    def layer_windows(self) -> list[int]:
        return [0] * self.args.n_layer

    def forward_hidden(self, ids: np.ndarray, positions: np.ndarray, cache, ops) -> np.ndarray:
        a, W = self.args, self.w
        n = len(ids)
        x = ops.embed(W.token_embd, ids)  # (n, n_embd)
        for i, (L, c) in enumerate(zip(W.blk, cache.layers)):
            qkv_b, out_b = self.biases[i]
            h = ops.rms_norm(x, L.attn_norm, a.rms_eps)
            q, k, v = ops.linears([L.attn_q, L.attn_k, L.attn_v], h, qkv_b)
            q = q.reshape(n, a.n_head, a.head_dim)
            k = k.reshape(n, a.n_head_kv, a.head_dim)
            v = v.reshape(n, a.n_head_kv, a.head_dim)
            q = ops.rope(q, positions, a.rope_dims, a.rope_base, self.rope_mode, a.rope_freq_scale)
            k = ops.rope(k, positions, a.rope_dims, a.rope_base, self.rope_mode, a.rope_freq_scale)
            o = ops.attention(q, k, v, c, positions, self.scale)
            x = x + ops.linear(L.attn_output, o, out_b)
            h = ops.rms_norm(x, L.ffn_norm, a.rms_eps)
            x = x + ops.glu_ffn(h, L.ffn_gate, L.ffn_up, L.ffn_down, "silu")
        return ops.rms_norm(x, W.output_norm, a.rms_eps)
