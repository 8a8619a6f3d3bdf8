"""`bert` architecture: BERT-family sentence encoders (all-MiniLM-L6-v2, bge-small, ...).

Token + position + token-type embeddings and a LayerNorm, then post-norm layers (attention,
add, LayerNorm; GELU FFN, add, LayerNorm), no causal mask: padded positions are masked out of
the keys. The sentence vector is pooled as ``{arch}.pooling_type`` says and L2-normalised.
GELU is the exact (erf) one BERT was trained with; llama.cpp uses the tanh approximation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pocketlm.models.base import (MAX_LAYERS, Capabilities, GGUFArgs, derived, expect,
                                  expect_layers, expect_that, key)
from pocketlm.nn import encoder
from pocketlm import nn


def _pooling(v) -> str:
    pooling = encoder.POOLING.get(int(v), "unsupported")
    if pooling in ("none", "unsupported"):
        raise ValueError(f"bert: pooling type {v} is not supported (mean, cls or last)")
    return pooling


def _not_causal(v) -> bool:
    if v:
        raise ValueError("bert: causal attention is not supported by this encoder")
    return False


@dataclass(frozen=True)
class ModelArgs(GGUFArgs):
    causal: bool = key("attention.causal", default=False, convert=_not_causal)  # refused
    n_embd: int = key("embedding_length", min=1)
    n_layer: int = key("block_count", min=1, max=MAX_LAYERS)
    n_head: int = key("attention.head_count", min=1)
    n_ff: int = key("feed_forward_length")
    n_ctx_train: int = key("context_length")
    norm_eps: float = key("attention.layer_norm_epsilon", default=1e-12, min=1e-20, max=1.0)
    pooling: str = key("pooling_type", default=1, convert=_pooling)   # "mean", "cls" or "last"
    # inputs are truncated to this many tokens (specials included)
    max_seq_len: int = derived(lambda a: min(a.n_ctx_train, int(a.get(
        "sentence_transformers.max_seq_length", a.n_ctx_train))))
    n_vocab: int = key("tokenizer.ggml.tokens", convert=len)

    def check(self, w) -> None:
        expect_that(self.n_embd % self.n_head == 0, self.key_name("attention.head_count"),
                    self.n_head, f"a divisor of embedding_length {self.n_embd}")
        e, ff = self.n_embd, self.n_ff
        expect(w, "token_embd", self.n_vocab, e)
        expect(w, "position_embd", self.n_ctx_train, e)
        expect(w, "token_embd_norm", e)
        expect_layers(w, attn_q=(e, e), attn_k=(e, e), attn_v=(e, e), attn_output=(e, e),
                      ffn_up=(ff, e), ffn_down=(e, ff), attn_output_norm=(e,),
                      layer_output_norm=(e,))


_LAYER_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_up", "ffn_down")
_LAYER_NORMS = ("attn_output_norm", "layer_output_norm")


class Model:
    """An encoder: ``embed(batch)`` turns token-id lists into unit sentence vectors."""

    capabilities = Capabilities(embed=True, backends=("numba", "numpy"))

    def __init__(self, args: ModelArgs, weights, backend: str = "numba"):
        self.args = args
        self.w = W = weights
        if len(W.blk) != args.n_layer:
            raise ValueError(f"model has {len(W.blk)} layers, metadata says {args.n_layer}")
        need = [(W, n) for n in ("token_embd", "position_embd", "token_embd_norm",
                                 "token_embd_norm_b")]
        need += [(L, n + s) for L in W.blk for n in _LAYER_TENSORS + _LAYER_NORMS
                 for s in ("", "_b")]
        for obj, name in need:
            if not hasattr(obj, name):
                raise ValueError(f"bert model lacks tensor {name}")
        if W.position_embd.shape[0] < args.max_seq_len:
            raise ValueError(f"position table has {W.position_embd.shape[0]} rows, "
                             f"fewer than the {args.max_seq_len} tokens allowed")
        # position and token-type tables as float32; single sentences only use token type 0
        self.tok = W.token_embd
        self.pos = W.position_embd.dequantize()                      # (n_ctx, n_embd)
        types = getattr(W, "token_types", None)
        self.type0 = (types.dequantize()[0] if types is not None
                      else np.zeros(args.n_embd, np.float32))         # (n_embd,)
        self.embd_norm = (W.token_embd_norm, W.token_embd_norm_b)
        self.scale = 1.0 / np.sqrt(args.n_embd // args.n_head)
        self.set_backend(backend)

    def set_backend(self, name: str) -> None:
        """"numba" (kernels on the stored blocks) or "numpy" (no JIT; weights held as float32)."""
        self.ops = o = nn.backend_ops(name)
        self.layers = [{n: o.weight(getattr(L, n)) for n in _LAYER_TENSORS}
                       | {n + "_b": getattr(L, n + "_b") for n in _LAYER_TENSORS + _LAYER_NORMS}
                       | {n: getattr(L, n) for n in _LAYER_NORMS}
                       for L in self.w.blk]

    def hidden(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Last-layer states (B, T, n_embd) of padded ids (B, T); lengths (B,) real tokens."""
        a, be = self.args, self.ops
        B, T = ids.shape
        H, D = a.n_head, a.n_embd // a.n_head
        x = be.embed(self.tok, ids.reshape(-1)).reshape(B, T, a.n_embd)
        x += self.pos[:T] + self.type0
        x = be.layer_norm(x.reshape(B * T, a.n_embd), *self.embd_norm, a.norm_eps)  # (B*T, d)
        for L in self.layers:
            q = be.linear(L["attn_q"], x, L["attn_q_b"]).reshape(B, T, H, D)
            k = be.linear(L["attn_k"], x, L["attn_k_b"]).reshape(B, T, H, D)
            v = be.linear(L["attn_v"], x, L["attn_v_b"]).reshape(B, T, H, D)
            o = encoder.attention(q, k, v, lengths, self.scale, be.softmax)        # (B*T, d)
            x = be.layer_norm(x + be.linear(L["attn_output"], o, L["attn_output_b"]),
                              L["attn_output_norm"], L["attn_output_norm_b"], a.norm_eps)
            f = be.gelu(be.linear(L["ffn_up"], x, L["ffn_up_b"]))                  # (B*T, ff)
            x = be.layer_norm(x + be.linear(L["ffn_down"], f, L["ffn_down_b"]),
                              L["layer_output_norm"], L["layer_output_norm_b"], a.norm_eps)
        return x.reshape(B, T, a.n_embd)

    def embed(self, batch: list[list[int]]) -> np.ndarray:
        """Unit-length sentence vectors (len(batch), n_embd) float32 for token-id lists."""
        lengths = np.array([len(s) for s in batch], np.int64)
        if lengths.min() < 1 or lengths.max() > self.args.max_seq_len:
            raise ValueError(f"sequences must have 1..{self.args.max_seq_len} tokens")
        ids = np.zeros((len(batch), int(lengths.max())), np.int64)   # (B, T) padded with 0
        for i, s in enumerate(batch):
            ids[i, :len(s)] = s
        if ids.max() >= self.args.n_vocab or ids.min() < 0:
            raise ValueError(f"token ids must lie in 0..{self.args.n_vocab - 1}")
        h = self.hidden(ids, lengths)
        return encoder.l2_normalize(encoder.pool(h, lengths, self.args.pooling))
