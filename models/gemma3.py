"""`gemma3` architecture: Gemma 3 text models.

Interleaved sliding-window (local) and global layers with their own RoPE bases, q/k RMSNorm,
norms before and after attention and FFN, GELU(tanh)-gated FFN, embeddings scaled by sqrt(d).
Norm weights already carry Gemma's +1 (added when the GGUF was converted).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pocketlm.models.base import (BaseModel, Capabilities, DecoderArgs, check_decoder,
                                  check_rope_scaling, derived, key, rope_freq_scale,
                                  rope_scaling, swa_layers)


@dataclass(frozen=True)
class ModelArgs(DecoderArgs):
    n_ff: int = key("feed_forward_length")
    rms_eps: float = key("attention.layer_norm_rms_epsilon", default=1e-6, min=1e-20, max=1.0)
    rope_base: float = key("rope.freq_base", default=1e6, min=1.0)
    rope_base_swa: float = key("rope.freq_base_swa", default=1e4, min=1.0)
    rope_scaling: str = derived(rope_scaling)
    rope_freq_scale: float = derived(rope_freq_scale)   # global layers only, as llama.cpp
    window: int = key("attention.sliding_window", default=0, convert=lambda v: max(int(v), 0))
    # the last layer of every period is global, the rest slide
    is_swa: tuple[bool, ...] = derived(lambda a: swa_layers(
        a.get("attention.sliding_window_pattern", 6), a.n_layer, False) if a.window
        else (False,) * a.n_layer)
    # Gemma-3 27B scales queries by 1/sqrt(d_model/heads); the others by 1/sqrt(head_dim).
    query_scale: float = derived(lambda a: 1.0 / np.sqrt(
        a.n_embd / a.n_head if a.n_layer == 62 else a.head_dim))
    # llama.cpp caps logits only when the model has no sliding-window layers
    final_softcap: float = derived(
        lambda a: 0.0 if a.window else a.get("final_logit_softcapping", 0.0))

    def check(self, w) -> None:
        e, ff, d = self.n_embd, self.n_ff, self.head_dim
        check_rope_scaling(self, "none", "linear")
        check_decoder(self, w, d, attn_q_norm=(d,), attn_k_norm=(d,), post_attention_norm=(e,),
                      ffn_norm=(e,), ffn_gate=(ff, e), ffn_up=(ff, e), ffn_down=(e, ff),
                      post_ffw_norm=(e,))


class Model(BaseModel):
    capabilities = Capabilities(generate=True, devices=("cpu", "cuda"))

    def layer_windows(self) -> list[int]:
        return [self.args.window if s else 0 for s in self.args.is_swa]

    def forward_hidden(self, ids: np.ndarray, positions: np.ndarray, cache, ops) -> np.ndarray:
        a, W = self.args, self.w
        n = len(ids)
        x = ops.embed(W.token_embd, ids) * np.float32(np.sqrt(a.n_embd))  # (n, n_embd)
        for i, (L, c) in enumerate(zip(W.blk, cache.layers)):
            swa = a.is_swa[i]
            base, fscale = (a.rope_base_swa, 1.0) if swa else (a.rope_base, a.rope_freq_scale)
            h = ops.rms_norm(x, L.attn_norm, a.rms_eps)
            q, k, v = ops.linears([L.attn_q, L.attn_k, L.attn_v], h)
            q = q.reshape(n, a.n_head, a.head_dim)
            k = k.reshape(n, a.n_head_kv, a.head_dim)
            v = v.reshape(n, a.n_head_kv, a.head_dim)
            q = ops.rope(ops.head_norm(q, L.attn_q_norm, a.rms_eps), positions, a.head_dim, base,
                         "neox", fscale)
            k = ops.rope(ops.head_norm(k, L.attn_k_norm, a.rms_eps), positions, a.head_dim, base,
                         "neox", fscale)
            o = ops.attention(q * np.float32(a.query_scale), k, v, c, positions, 1.0)
            x = x + ops.rms_norm(ops.linear(L.attn_output, o), L.post_attention_norm, a.rms_eps)
            h = ops.rms_norm(x, L.ffn_norm, a.rms_eps)
            f = ops.glu_ffn(h, L.ffn_gate, L.ffn_up, L.ffn_down, "gelu")
            x = x + ops.rms_norm(f, L.post_ffw_norm, a.rms_eps)
        return ops.rms_norm(x, W.output_norm, a.rms_eps)

    def logits(self, hidden: np.ndarray, ops) -> np.ndarray:
        out = super().logits(hidden, ops)
        if self.args.final_softcap > 0:
            cap = np.float32(self.args.final_softcap)
            out = np.tanh(out / cap) * cap
        return out
