"""Synthetic llama-shaped MoE models for ``tools.synth``: ``qwen3moe``, ``qwen2moe``, ``llama``
with experts (Mixtral), ``olmoe`` and ``granitemoe``, with the metadata keys and tensors
llama.cpp's converter writes for each. Each architecture's module (``synth_qwen3moe``, …)
holds its presets and takes ``build`` from ``builder(arch)``.

Shape fields: ``n_layer``, ``n_embd``, ``n_head``, ``n_head_kv``, ``head_dim``, ``n_ff`` (the
dense width written as ``feed_forward_length``), ``n_expert``, ``n_expert_used``, ``n_ff_exp``
(the expert width; written as ``expert_feed_forward_length`` where the architecture has that
key), ``n_ff_shexp`` (qwen2moe's shared expert), ``n_ctx``, ``rope_base``, ``eps``, ``std``
(weight init; the ``routed`` recipe scales the residual projections by 1/sqrt(2 n_layer)) and,
for granitemoe, the four multipliers ``embedding_scale``, ``residual_scale``,
``attention_scale`` and ``logit_scale``. Norm gains and biases are drawn so tests see them.
The vocabulary (and so its size) is the copied tokenizer's.
"""
from __future__ import annotations

import math

import numpy as np

from pocketlm.tools.synth import SynthModel, TensorSpec, normal

# per architecture: q/k norm ("head", "full" or None), q/k/v biases, a gated shared expert,
# the expert width key, the head-size keys, granite's multipliers
FEATURES = {
    "qwen3moe": dict(qk_norm="head", bias=False, shexp=False, ff_exp_key=True, head_keys=True,
                     mup=False),
    "qwen2moe": dict(qk_norm=None, bias=True, shexp=True, ff_exp_key=True, head_keys=False,
                     mup=False),
    "llama": dict(qk_norm=None, bias=False, shexp=False, ff_exp_key=False, head_keys=False,
                  mup=False),
    "olmoe": dict(qk_norm="full", bias=False, shexp=False, ff_exp_key=False, head_keys=False,
                  mup=False),
    "granitemoe": dict(qk_norm=None, bias=False, shexp=False, ff_exp_key=False,
                       head_keys=False, mup=True),
}


def gain(rng, shape):
    """Norm gains about 1, drawn so that tests see them."""
    return 1.0 + np.float32(0.1) * rng.standard_normal(shape, dtype=np.float32)


def tiny(**changes) -> dict:
    """The tiny shape every architecture's test preset starts from."""
    return dict(dict(n_layer=3, n_embd=128, n_head=4, n_head_kv=2, head_dim=32, n_ff=256,
                     n_expert=8, n_expert_used=2, n_ff_exp=64, n_ff_shexp=0, n_ctx=256,
                     rope_base=10000.0, eps=1e-6, std=0.02), **changes)


def builder(arch: str):
    """``build(shape, options, n_vocab)`` for ``arch``."""
    f = FEATURES[arch]

    def build(c: dict, opts, n_vocab: int) -> SynthModel:
        # opts.gating is not used: these architectures always route by softmax
        if opts.sliding_window or opts.down_transposed:
            raise ValueError(f"{arch} has no sliding window or transposed expert layout")
        if opts.recipe not in ("plain", "routed"):
            raise ValueError(f"unknown init recipe {opts.recipe!r} (choose from plain, routed)")
        L, d, H, KVH, hd, E = (c["n_layer"], c["n_embd"], c["n_head"], c["n_head_kv"],
                               c["head_dim"], c["n_expert"])
        if not 0 < c["n_expert_used"] <= E:
            raise ValueError(f"{c['n_expert_used']} experts per token with {E} experts")
        if not f["head_keys"] and H * hd != d:
            raise ValueError(f"{arch}: n_head x head_dim must be n_embd {d}")
        ff, sff = c["n_ff_exp"] if f["ff_exp_key"] else c["n_ff"], c["n_ff_shexp"]
        std = c["std"]
        out_std = std / math.sqrt(2 * L) if opts.recipe == "routed" else std
        p = f"{arch}."
        meta = [
            (p + "context_length", c["n_ctx"], "u32"),
            (p + "embedding_length", d, "u32"),
            (p + "block_count", L, "u32"),
            (p + "feed_forward_length", c["n_ff"], "u32"),
            (p + "attention.head_count", H, "u32"),
            (p + "attention.head_count_kv", KVH, "u32"),
            (p + "rope.freq_base", c["rope_base"], "f32"),
            (p + "attention.layer_norm_rms_epsilon", c["eps"], "f32"),
            (p + "expert_count", E, "u32"),
            (p + "expert_used_count", c["n_expert_used"], "u32"),
        ]
        if f["head_keys"]:
            meta += [(p + "attention.key_length", hd, "u32"),
                     (p + "attention.value_length", hd, "u32")]
        else:
            meta.append((p + "rope.dimension_count", hd, "u32"))
        if f["ff_exp_key"]:
            meta.append((p + "expert_feed_forward_length", ff, "u32"))
        if f["shexp"]:
            meta.append((p + "expert_shared_feed_forward_length", sff, "u32"))
        if f["mup"]:
            meta += [(p + "embedding_scale", c["embedding_scale"], "f32"),
                     (p + "residual_scale", c["residual_scale"], "f32"),
                     (p + "attention.scale", c["attention_scale"], "f32"),
                     (p + "logit_scale", c["logit_scale"], "f32")]

        q, f32, w = opts.qtype, "F32", normal(std)
        tensors = [TensorSpec("token_embd.weight", (n_vocab, d), q, w),
                   TensorSpec("output_norm.weight", (d,), f32, gain),
                   TensorSpec("output.weight", (n_vocab, d), q, w)]
        qn = {"head": hd, "full": H * hd, None: 0}[f["qk_norm"]]
        for i in range(L):
            b = f"blk.{i}."
            tensors += [TensorSpec(b + "attn_norm.weight", (d,), f32, gain)]
            for name, rows in (("attn_q", H * hd), ("attn_k", KVH * hd), ("attn_v", KVH * hd)):
                tensors.append(TensorSpec(b + name + ".weight", (rows, d), q, w))
                if f["bias"]:
                    tensors.append(TensorSpec(b + name + ".bias", (rows,), f32, w))
            tensors.append(TensorSpec(b + "attn_output.weight", (d, H * hd), q, normal(out_std)))
            if qn:
                kn = hd if f["qk_norm"] == "head" else KVH * hd
                tensors += [TensorSpec(b + "attn_q_norm.weight", (qn,), f32, gain),
                            TensorSpec(b + "attn_k_norm.weight", (kn,), f32, gain)]
            tensors += [
                TensorSpec(b + "ffn_norm.weight", (d,), f32, gain),
                TensorSpec(b + "ffn_gate_inp.weight", (E, d), f32, w),
                TensorSpec(b + "ffn_gate_exps.weight", (E, ff, d), q, w),
                TensorSpec(b + "ffn_up_exps.weight", (E, ff, d), q, w),
                TensorSpec(b + "ffn_down_exps.weight", (E, d, ff), q, normal(out_std)),
            ]
            if f["shexp"]:
                tensors += [
                    TensorSpec(b + "ffn_gate_inp_shexp.weight", (d,), f32, w),
                    TensorSpec(b + "ffn_gate_shexp.weight", (sff, d), q, w),
                    TensorSpec(b + "ffn_up_shexp.weight", (sff, d), q, w),
                    TensorSpec(b + "ffn_down_shexp.weight", (d, sff), q, normal(out_std)),
                ]
        return SynthModel(arch, meta, tensors)
    return build
