"""Synthetic `minicpm` models for ``tools.synth``: metadata keys as llama.cpp's converter writes
them (spec: shared/specs/minicpm.md, sections 2, 3, 6 and 9).

Presets: ``minicpm-tiny`` (tests), ``minicpm4-0.5b`` (MiniCPM4-0.5B shapes), ``minicpm-2b``
(MiniCPM-2B) and ``minicpm-moe`` (MiniCPM-MoE-8x2B). Shape fields beyond the sizes:
``scale_emb``, ``scale_depth``, ``dim_model_base`` (the HF config's muP values, from which the
converter derives ``embedding_scale``, ``residual_scale = scale_depth/sqrt(n_layer)`` and
``logit_scale = n_embd/dim_model_base``), ``mup_keys`` (0: leave the three keys out, so
llama.cpp uses its defaults), ``longrope`` (1: ``rope.scaling.type = longrope`` plus the
global ``rope_factors_long``/``_short`` tensors, drawn from U(1, 8) and U(1, 2), sorted) and
``std`` (weight init; ``routed`` recipe scales the residual projections by 1/sqrt(2 n_layer)).
Norm gains are 1 + N(0, 0.1²) so that tests see them.
"""
from __future__ import annotations

import math

import numpy as np

from pocketlm.gguf.writer import KV, write_gguf
from pocketlm.tools.synth import SynthModel, TensorSpec, normal

ARCH = "minicpm"

_MUP = dict(scale_emb=12.0, scale_depth=1.4, dim_model_base=256, mup_keys=1, longrope=0,
            std=0.02, rope_base=10000.0, n_expert=0, n_expert_used=0)
PRESETS = {
    "minicpm-tiny": dict(_MUP, n_layer=3, n_embd=128, n_head=4, n_head_kv=2, n_ff=256,
                         n_ctx=256, eps=1e-5, dim_model_base=32),
    "minicpm4-0.5b": dict(_MUP, n_layer=24, n_embd=1024, n_head=16, n_head_kv=2, n_ff=4096,
                          n_ctx=32768, eps=1e-6),
    "minicpm-2b": dict(_MUP, n_layer=40, n_embd=2304, n_head=36, n_head_kv=36, n_ff=5760,
                       n_ctx=4096, eps=1e-5),
    "minicpm-moe": dict(_MUP, n_layer=40, n_embd=2304, n_head=36, n_head_kv=36, n_ff=5760,
                        n_ctx=4096, eps=1e-5, n_expert=8, n_expert_used=2),
}


def _gain(rng, shape):
    return 1.0 + np.float32(0.1) * rng.standard_normal(shape, dtype=np.float32)


def _factors(lo: float, hi: float):
    return lambda rng, shape: np.sort(rng.uniform(lo, hi, shape)).astype(np.float32)


def scales(c: dict) -> tuple[float, float, float]:
    """(embedding_scale, residual_scale, logit_scale) as the converter writes them."""
    return (c["scale_emb"], c["scale_depth"] / math.sqrt(c["n_layer"]),
            c["n_embd"] / c["dim_model_base"])


def build(c: dict, opts, n_vocab: int) -> SynthModel:
    # opts.gating is not used: minicpm has no gating key, llama.cpp always routes by softmax
    if opts.sliding_window or opts.down_transposed:
        raise ValueError("minicpm has no sliding window or transposed expert layout")
    if opts.recipe not in ("plain", "routed"):
        raise ValueError(f"unknown init recipe {opts.recipe!r} (choose from plain, routed)")
    L, d, H, KVH, ff, E = (c["n_layer"], c["n_embd"], c["n_head"], c["n_head_kv"], c["n_ff"],
                           c["n_expert"])
    if d % H:
        raise ValueError(f"n_embd {d} is not a multiple of n_head {H}")
    if E and not 0 < c["n_expert_used"] <= E:
        raise ValueError(f"{c['n_expert_used']} experts per token with {E} experts")
    hd = d // H
    std = c["std"]
    out_std = std / math.sqrt(2 * L) if opts.recipe == "routed" else std
    p = f"{ARCH}."
    meta = [
        (p + "context_length", c["n_ctx"], "u32"),
        (p + "embedding_length", d, "u32"),
        (p + "block_count", L, "u32"),
        (p + "feed_forward_length", ff, "u32"),
        (p + "rope.dimension_count", hd, "u32"),
        (p + "attention.head_count", H, "u32"),
        (p + "attention.head_count_kv", KVH, "u32"),
        (p + "attention.layer_norm_rms_epsilon", c["eps"], "f32"),
    ]
    if c["rope_base"] != 10000.0:    # the converter writes it only when the config has it
        meta.append((p + "rope.freq_base", c["rope_base"], "f32"))
    if E:
        meta += [(p + "expert_count", E, "u32"), (p + "expert_used_count", c["n_expert_used"],
                                                  "u32")]
    if c["mup_keys"]:
        es, rs, ls = scales(c)
        meta += [(p + "embedding_scale", es, "f32"), (p + "residual_scale", rs, "f32"),
                 (p + "logit_scale", ls, "f32")]
    if c["longrope"]:
        meta.append((p + "rope.scaling.type", "longrope", "str"))

    q, f32 = opts.qtype, "F32"
    tensors = [TensorSpec("token_embd.weight", (n_vocab, d), q, normal(std)),
               TensorSpec("output_norm.weight", (d,), f32, _gain)]
    if c["longrope"]:
        tensors += [TensorSpec("rope_factors_long.weight", (hd // 2,), f32, _factors(1, 8)),
                    TensorSpec("rope_factors_short.weight", (hd // 2,), f32, _factors(1, 2))]
    for i in range(L):
        b = f"blk.{i}."
        tensors += [
            TensorSpec(b + "attn_norm.weight", (d,), f32, _gain),
            TensorSpec(b + "attn_q.weight", (H * hd, d), q, normal(std)),
            TensorSpec(b + "attn_k.weight", (KVH * hd, d), q, normal(std)),
            TensorSpec(b + "attn_v.weight", (KVH * hd, d), q, normal(std)),
            TensorSpec(b + "attn_output.weight", (d, H * hd), q, normal(out_std)),
            TensorSpec(b + "ffn_norm.weight", (d,), f32, _gain),
        ]
        if E:
            tensors += [
                TensorSpec(b + "ffn_gate_inp.weight", (E, d), f32, normal(std)),
                TensorSpec(b + "ffn_gate_exps.weight", (E, ff, d), q, normal(std)),
                TensorSpec(b + "ffn_up_exps.weight", (E, ff, d), q, normal(std)),
                TensorSpec(b + "ffn_down_exps.weight", (E, d, ff), q, normal(out_std)),
            ]
        else:
            tensors += [
                TensorSpec(b + "ffn_gate.weight", (ff, d), q, normal(std)),
                TensorSpec(b + "ffn_up.weight", (ff, d), q, normal(std)),
                TensorSpec(b + "ffn_down.weight", (d, ff), q, normal(out_std)),
            ]
    return SynthModel(ARCH, meta, tensors)


def vocab_gguf(path, n: int = 512):
    """A vocabulary-only GGUF to copy the tokenizer from: SentencePiece-style (``<unk>``,
    ``<s>``, ``</s>``, the 256 byte tokens, ChatML markers, filler pieces) with a ChatML
    template, as MiniCPM4 uses; small, so test references stay small."""
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    toks += ["<|im_start|>", "<|im_end|>"]
    types = [2, 3, 3] + [6] * 256 + [3, 3]
    toks += [f"\u2581w{k}" for k in range(n - len(toks))]
    types += [1] * (n - len(types))
    kv = [KV("general.architecture", "str", "llama"), KV("tokenizer.ggml.model", "str", "llama"),
          KV("tokenizer.ggml.tokens", "array", toks, "str"),
          KV("tokenizer.ggml.scores", "array", [0.0] * 261 + [-float(i) for i in range(n - 261)],
             "f32"),
          KV("tokenizer.ggml.token_type", "array", types, "i32"),
          KV("tokenizer.ggml.bos_token_id", "u32", 1), KV("tokenizer.ggml.eos_token_id", "u32", 2),
          KV("tokenizer.ggml.unknown_token_id", "u32", 0),
          KV("tokenizer.ggml.add_bos_token", "bool", True),
          KV("tokenizer.chat_template", "str",
             "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
             "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
             "{{ '<|im_start|>assistant\n' }}{% endif %}")]
    write_gguf(path, kv, [])
    return path
