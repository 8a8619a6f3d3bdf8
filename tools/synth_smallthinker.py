"""Synthetic `smallthinker` models for ``tools.synth``: metadata keys as llama.cpp's converter
writes them (spec: shared/specs/smallthinker.md, sections 2, 3 and 8), tensors in the order of
the shared tiny model, routers and norms F32, tied output head.
"""
from __future__ import annotations

import math

from pocketlm.tools.synth import SynthModel, TensorSpec, constant, normal

ARCH = "smallthinker"
GATING = {"softmax": 1, "sigmoid": 2, "none": None}
SWA_WINDOW = 4096

_COMMON = dict(n_ctx=4096, head_dim=128, n_ff_exp=768, rope_base=1.5e6, eps=1e-6)
PRESETS = {
    "tiny": dict(_COMMON, n_layer=4, n_embd=256, n_head=4, n_head_kv=2, head_dim=64,
                 n_expert=8, n_expert_used=2, n_ff_exp=128, swa=False),
    "4b-a0.6b": dict(_COMMON, n_ctx=32768, n_layer=32, n_embd=1536, n_head=12, n_head_kv=2,
                     n_expert=32, n_expert_used=4, swa=False),
    "21b-a3b": dict(_COMMON, n_ctx=16384, n_layer=52, n_embd=2560, n_head=28, n_head_kv=4,
                    n_expert=64, n_expert_used=6, swa=True),
}

STD = 0.02


def attn_out_std(recipe: str, n_layer: int, scale: float | None = None) -> float:
    """Standard deviation of ``attn_output``; every other matrix is N(0, 0.02).

    ``plain``: 0.02 (the shared tiny model). ``routed``: 0.02/sqrt(2 n_layer), GPT-2's init for
    residual projections. With random weights attention averages values over the context, so
    its output is nearly the same for every token; at full scale it swamps the token's own state
    in the residual stream and every router picks the same experts. The experts' outputs are
    functions of the token, so they keep token identity and stay at full scale. ``scale``
    (0.02 x scale) overrides the recipe: between the two it sets how much routing follows the
    context rather than the token.
    """
    if recipe not in ("plain", "routed"):
        raise ValueError(f"unknown init recipe {recipe!r} (choose from plain, routed)")
    if scale is not None:
        if not scale > 0:
            raise ValueError(f"attention scale must be positive, got {scale}")
        return STD * scale
    return STD / math.sqrt(2 * n_layer) if recipe == "routed" else STD


def build(c: dict, opts, n_vocab: int) -> SynthModel:
    if opts.gating not in GATING:
        raise ValueError(f"unknown gating {opts.gating!r} (choose from {', '.join(GATING)})")
    if c["n_expert_used"] > c["n_expert"]:
        raise ValueError(f"{c['n_expert_used']} experts per token but only {c['n_expert']}")
    swa = c["swa"] if opts.sliding_window is None else opts.sliding_window
    w, w_out = normal(STD), normal(attn_out_std(opts.recipe, c["n_layer"], opts.attn_scale))
    d, hd, E, ff = c["n_embd"], c["head_dim"], c["n_expert"], c["n_ff_exp"]
    p = f"{ARCH}."
    meta = [
        (p + "context_length", c["n_ctx"], "u32"),
        (p + "embedding_length", d, "u32"),
        (p + "block_count", c["n_layer"], "u32"),
        (p + "feed_forward_length", ff, "u32"),
        (p + "attention.head_count", c["n_head"], "u32"),
        (p + "attention.head_count_kv", c["n_head_kv"], "u32"),
        (p + "attention.key_length", hd, "u32"),
        (p + "attention.value_length", hd, "u32"),
        (p + "rope.dimension_count", hd, "u32"),
        (p + "rope.freq_base", c["rope_base"], "f32"),
        (p + "attention.layer_norm_rms_epsilon", c["eps"], "f32"),
        (p + "expert_count", E, "u32"),
        (p + "expert_used_count", c["n_expert_used"], "u32"),
        (p + "expert_feed_forward_length", ff, "u32"),
    ]
    if GATING[opts.gating] is not None:
        meta.append((p + "expert_gating_func", GATING[opts.gating], "u32"))
    meta.append((p + "vocab_size", n_vocab, "u32"))
    if swa:
        meta.append((p + "attention.sliding_window", SWA_WINDOW, "u32"))

    q, f32 = opts.qtype, "F32"
    ones = constant(1.0)
    tensors = [TensorSpec("token_embd.weight", (n_vocab, d), q, w)]
    for i in range(c["n_layer"]):
        b = f"blk.{i}."
        down_shape = (E, ff, d) if opts.down_transposed else (E, d, ff)
        tensors += [
            TensorSpec(b + "attn_norm.weight", (d,), f32, ones),
            TensorSpec(b + "attn_q.weight", (c["n_head"] * hd, d), q, w),
            TensorSpec(b + "attn_k.weight", (c["n_head_kv"] * hd, d), q, w),
            TensorSpec(b + "attn_v.weight", (c["n_head_kv"] * hd, d), q, w),
            TensorSpec(b + "attn_output.weight", (d, c["n_head"] * hd), q, w_out),
            TensorSpec(b + "ffn_norm.weight", (d,), f32, ones),
            TensorSpec(b + "ffn_gate_inp.weight", (E, d), f32, w),
            TensorSpec(b + "ffn_gate_exps.weight", (E, ff, d), q, w),
            TensorSpec(b + "ffn_down_exps.weight", down_shape, q, w,
                       transposed=opts.down_transposed),
            TensorSpec(b + "ffn_up_exps.weight", (E, ff, d), q, w),
        ]
    tensors.append(TensorSpec("output_norm.weight", (d,), f32, ones))
    return SynthModel(ARCH, meta, tensors)
