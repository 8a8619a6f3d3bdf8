"""`gemma3` architecture: Gemma 3 text models.

Interleaved sliding-window (local) and global layers with their own RoPE bases, q/k RMSNorm,
norms before and after attention and FFN, GELU(tanh)-gated FFN, embeddings scaled by sqrt(d).
Norm weights already carry Gemma's +1 (added when the GGUF was converted).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pocketlm.models.base import BaseModel, meta_get, rope_linear_scale, swa_layers
from pocketlm import nn


@dataclass(frozen=True)
class ModelArgs:
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    rms_eps: float
    rope_base: float
    rope_base_swa: float
    rope_freq_scale: float
    window: int
    is_swa: tuple[bool, ...]
    query_scale: float
    final_softcap: float
    n_vocab: int

    @classmethod
    def from_gguf(cls, meta: dict) -> "ModelArgs":
        g = meta_get(meta)
        n_layer = g("block_count")
        n_embd = g("embedding_length")
        n_head = g("attention.head_count")
        head_dim = g("attention.key_length", n_embd // n_head)
        window = g("attention.sliding_window", 0)
        pattern = g("attention.sliding_window_pattern", 6)
        # the last layer of every period is global, the rest slide
        is_swa = swa_layers(pattern, n_layer, False) if window > 0 else (False,) * n_layer
        # Gemma-3 27B scales queries by 1/sqrt(d_model/heads); the others by 1/sqrt(head_dim).
        q_scale = 1.0 / np.sqrt(n_embd / n_head if n_layer == 62 else head_dim)
        return cls(
            n_embd=n_embd, n_layer=n_layer, n_head=n_head,
            n_head_kv=g("attention.head_count_kv", n_head), head_dim=head_dim,
            n_ff=g("feed_forward_length"), rms_eps=g("attention.layer_norm_rms_epsilon", 1e-6),
            rope_base=g("rope.freq_base", 1e6), rope_base_swa=g("rope.freq_base_swa", 1e4),
            rope_freq_scale=rope_linear_scale(g), window=window if window > 0 else 0,
            is_swa=is_swa, query_scale=float(q_scale),
            # llama.cpp caps logits only when the model has no sliding-window layers
            final_softcap=g("final_logit_softcapping", 0.0) if window <= 0 else 0.0,
            n_vocab=len(meta["tokenizer.ggml.tokens"]),
        )


class Model(BaseModel):
    def layer_windows(self) -> list[int]:
        return [self.args.window if s else 0 for s in self.args.is_swa]

    def forward_hidden(self, ids: np.ndarray, positions: np.ndarray, cache) -> np.ndarray:
        a, W = self.args, self.w
        n = len(ids)
        x = nn.embed(W.token_embd, ids) * np.float32(np.sqrt(a.n_embd))  # (n, n_embd)
        for i, (L, c) in enumerate(zip(W.blk, cache.layers)):
            swa = a.is_swa[i]
            base, fscale = (a.rope_base_swa, 1.0) if swa else (a.rope_base, a.rope_freq_scale)
            h = nn.rms_norm(x, L.attn_norm, a.rms_eps)
            q, k, v = nn.linears([L.attn_q, L.attn_k, L.attn_v], h)
            q = q.reshape(n, a.n_head, a.head_dim)
            k = k.reshape(n, a.n_head_kv, a.head_dim)
            v = v.reshape(n, a.n_head_kv, a.head_dim)
            q = nn.rope(nn.head_norm(q, L.attn_q_norm, a.rms_eps), positions, a.head_dim, base,
                        "neox", fscale)
            k = nn.rope(nn.head_norm(k, L.attn_k_norm, a.rms_eps), positions, a.head_dim, base,
                        "neox", fscale)
            o = nn.attention(q * np.float32(a.query_scale), k, v, c, positions, 1.0)
            x = x + nn.rms_norm(nn.linear(L.attn_output, o), L.post_attention_norm, a.rms_eps)
            h = nn.rms_norm(x, L.ffn_norm, a.rms_eps)
            f = nn.glu_ffn(h, L.ffn_gate, L.ffn_up, L.ffn_down, "gelu")
            x = x + nn.rms_norm(f, L.post_ffw_norm, a.rms_eps)
        return nn.rms_norm(x, W.output_norm, a.rms_eps)

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        out = super().logits(hidden)
        if self.args.final_softcap > 0:
            cap = np.float32(self.args.final_softcap)
            out = np.tanh(out / cap) * cap
        return out
