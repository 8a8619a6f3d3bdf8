"""Synthetic `gpt-oss` models for ``tools.synth``: ``gpt-oss-tiny`` (tests) and
``gpt-oss-20b`` (gpt-oss-20b's shape), with the metadata keys and tensors llama.cpp's
converter writes: YaRN RoPE, alternating sliding-window layers, attention sinks, biases on
q/k/v/output, the router and every expert product. Experts are MXFP4, as in the released
files; the other matrices take ``--type``.

Shape fields: ``n_layer``, ``n_embd``, ``n_head``, ``n_head_kv``, ``head_dim``, ``n_expert``,
``n_expert_used``, ``n_ff_exp``, ``window``, ``n_ctx``, ``rope_base``, ``yarn_factor``,
``yarn_orig_ctx``, ``eps``, ``std`` (weights; biases draw at the same std, sinks at 1).
"""
from __future__ import annotations

import math

from pocketlm.tools.synth import SynthModel, TensorSpec, normal
from pocketlm.tools.synth_moe import gain

ARCH = "gpt-oss"
PRESETS = {
    # window 8: the tests' prompts reach past it; yarn over a 64-token original context
    "gpt-oss-tiny": dict(n_layer=3, n_embd=128, n_head=4, n_head_kv=2, head_dim=48,
                         n_expert=8, n_expert_used=2, n_ff_exp=64, window=8, n_ctx=256,
                         rope_base=150000.0, yarn_factor=4.0, yarn_orig_ctx=64, eps=1e-5,
                         std=0.02),
    "gpt-oss-20b": dict(n_layer=24, n_embd=2880, n_head=64, n_head_kv=8, head_dim=64,
                        n_expert=32, n_expert_used=4, n_ff_exp=2880, window=128,
                        n_ctx=131072, rope_base=150000.0, yarn_factor=32.0,
                        yarn_orig_ctx=4096, eps=1e-5, std=0.02),
}
EXPERT_QTYPE = "MXFP4"


def build(c: dict, opts, n_vocab: int) -> SynthModel:
    if opts.sliding_window is not None or opts.down_transposed:
        raise ValueError("gpt-oss's sliding-window layout is fixed (every other layer), and "
                         "its experts are not stored transposed")
    if opts.recipe not in ("plain", "routed"):
        raise ValueError(f"unknown init recipe {opts.recipe!r} (choose from plain, routed)")
    L, d, H, KVH, hd, E, ff = (c["n_layer"], c["n_embd"], c["n_head"], c["n_head_kv"],
                               c["head_dim"], c["n_expert"], c["n_ff_exp"])
    if not 0 < c["n_expert_used"] <= E:
        raise ValueError(f"{c['n_expert_used']} experts per token with {E} experts")
    std = c["std"]
    out_std = std / math.sqrt(2 * L) if opts.recipe == "routed" else std
    p = ARCH + "."
    meta = [
        (p + "context_length", c["n_ctx"], "u32"),
        (p + "embedding_length", d, "u32"),
        (p + "feed_forward_length", ff, "u32"),
        (p + "block_count", L, "u32"),
        (p + "attention.head_count", H, "u32"),
        (p + "attention.head_count_kv", KVH, "u32"),
        (p + "rope.freq_base", c["rope_base"], "f32"),
        (p + "attention.layer_norm_rms_epsilon", c["eps"], "f32"),
        (p + "expert_count", E, "u32"),
        (p + "expert_used_count", c["n_expert_used"], "u32"),
        (p + "attention.key_length", hd, "u32"),
        (p + "attention.value_length", hd, "u32"),
        (p + "rope.scaling.type", "yarn", "str"),
        (p + "rope.scaling.factor", c["yarn_factor"], "f32"),
        (p + "rope.scaling.original_context_length", c["yarn_orig_ctx"], "u32"),
        (p + "attention.sliding_window", c["window"], "u32"),
        (p + "expert_feed_forward_length", ff, "u32"),
    ]
    q, f32, w = opts.qtype, "F32", normal(std)
    tensors = [TensorSpec("token_embd.weight", (n_vocab, d), q, w),
               TensorSpec("output_norm.weight", (d,), f32, gain),
               TensorSpec("output.weight", (n_vocab, d), q, w)]
    for i in range(L):
        b = f"blk.{i}."
        tensors.append(TensorSpec(b + "attn_norm.weight", (d,), f32, gain))
        for name, rows in (("attn_q", H * hd), ("attn_k", KVH * hd), ("attn_v", KVH * hd)):
            tensors += [TensorSpec(b + name + ".weight", (rows, d), q, w),
                        TensorSpec(b + name + ".bias", (rows,), f32, w)]
        tensors += [
            TensorSpec(b + "attn_output.weight", (d, H * hd), q, normal(out_std)),
            TensorSpec(b + "attn_output.bias", (d,), f32, w),
            TensorSpec(b + "attn_sinks.weight", (H,), f32, normal(1.0)),
            TensorSpec(b + "post_attention_norm.weight", (d,), f32, gain),
            TensorSpec(b + "ffn_gate_inp.weight", (E, d), f32, w),
            TensorSpec(b + "ffn_gate_inp.bias", (E,), f32, w),
            TensorSpec(b + "ffn_gate_exps.weight", (E, ff, d), EXPERT_QTYPE, w),
            TensorSpec(b + "ffn_gate_exps.bias", (E, ff), f32, w),
            TensorSpec(b + "ffn_up_exps.weight", (E, ff, d), EXPERT_QTYPE, w),
            TensorSpec(b + "ffn_up_exps.bias", (E, ff), f32, w),
            TensorSpec(b + "ffn_down_exps.weight", (E, d, ff), EXPERT_QTYPE, normal(out_std)),
            TensorSpec(b + "ffn_down_exps.bias", (E, d), f32, w),
        ]
    return SynthModel(ARCH, meta, tensors)
