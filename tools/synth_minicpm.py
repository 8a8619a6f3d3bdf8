"""Synthetic `minicpm` GGUF models: random weights at the shapes of released MiniCPM models.

Presets: ``tiny`` (tests), ``0.5b`` (MiniCPM4-0.5B shapes), ``2b`` (MiniCPM-2B), ``moe``
(MiniCPM-MoE-8x2B). Metadata uses the keys llama.cpp's converter writes for the arch,
including the muP scales; ``longrope=True`` adds MiniCPM4's LongRoPE factor tensors, and
``scales=None`` leaves the scale keys out (llama.cpp then uses its defaults). The vocabulary is
a SentencePiece-style list (``<unk>``, ``<s>``, ``</s>``, the 256 byte tokens, ChatML markers,
then filler pieces) so that llama.cpp and our tokenizer load it; the logits are meaningless as
language. The same seed gives the same bytes.

    python -m tools.synth_minicpm tiny out.gguf [--qtype Q4_0] [--seed 0]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np

ARCH = "minicpm"

# shapes of the released models (spec: shared/specs/minicpm.md, section 9)
PRESETS = {
    "tiny": dict(n_layer=3, n_embd=128, n_head=4, n_head_kv=2, n_ff=256, n_vocab=512,
                 n_ctx=256, eps=1e-5, dim_model_base=32),
    "0.5b": dict(n_layer=24, n_embd=1024, n_head=16, n_head_kv=2, n_ff=4096, n_vocab=73448,
                 n_ctx=32768, eps=1e-6, dim_model_base=256),
    "2b": dict(n_layer=40, n_embd=2304, n_head=36, n_head_kv=36, n_ff=5760, n_vocab=122753,
               n_ctx=4096, eps=1e-5, dim_model_base=256),
    "moe": dict(n_layer=40, n_embd=2304, n_head=36, n_head_kv=36, n_ff=5760, n_vocab=122753,
                n_ctx=4096, eps=1e-5, dim_model_base=256, n_expert=8, n_expert_used=2),
}
SCALE_EMB = 12.0
SCALE_DEPTH = 1.4
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")


def vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style tokens, scores and types (1 normal, 2 unknown, 3 control, 6 byte)."""
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    toks += ["<|im_start|>", "<|im_end|>"]
    types += [3, 3]
    k = 0
    while len(toks) < n:
        toks.append(f"\u2581w{k}")
        types.append(1)
        k += 1
    scores = [0.0] * 3 + [0.0] * 256 + [0.0, 0.0] + [-float(i) for i in range(n - 261)]
    return toks[:n], scores[:n], types[:n]


def default_scales(cfg: dict) -> dict:
    """muP scales as the converter derives them from the HF config."""
    return dict(embedding=SCALE_EMB, residual=SCALE_DEPTH / np.sqrt(cfg["n_layer"]),
                logit=cfg["n_embd"] / cfg["dim_model_base"])


def write(path: str | Path, preset: str = "tiny", qtype: str = "Q4_0", seed: int = 0,
          std: float = 0.02, scales: dict | None | str = "default", longrope: bool = False,
          **overrides) -> Path:
    """Write a synthetic model; ``overrides`` change preset fields (n_layer, n_expert, …).

    ``scales``: "default" (the converter's values), None (no scale keys) or a dict with
    ``embedding``, ``residual``, ``logit``. Matrices are stored in ``qtype``; norms, rope
    factors and the MoE router stay F32.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    cfg = {**PRESETS[preset], **overrides}
    L, d, H, KVH = cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["n_head_kv"]
    hd, ff, E = d // H, cfg["n_ff"], cfg.get("n_expert", 0)
    rng = np.random.default_rng(seed)
    gq = gguf.GGMLQuantizationType[qtype]
    path = Path(path)
    w = gguf.GGUFWriter(str(path), ARCH)
    w.add_name(f"MiniCPM synthetic {preset}")
    w.add_context_length(cfg["n_ctx"])
    w.add_embedding_length(d)
    w.add_block_count(L)
    w.add_feed_forward_length(ff)
    w.add_head_count(H)
    w.add_head_count_kv(KVH)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(cfg["eps"])
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_0) if qtype == "Q4_0"
                    else int(gguf.LlamaFileType.ALL_F32))
    if scales == "default":
        scales = default_scales(cfg)
    if scales is not None:
        w.add_float32(f"{ARCH}.embedding_scale", scales["embedding"])
        w.add_float32(f"{ARCH}.residual_scale", scales["residual"])
        w.add_float32(f"{ARCH}.logit_scale", scales["logit"])
    if longrope:
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    if E:
        w.add_expert_count(E)
        w.add_expert_used_count(cfg["n_expert_used"])
    toks, scores, types = vocab(cfg["n_vocab"])
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_chat_template(CHATML)

    def mat(name, shape):
        x = (std * rng.standard_normal(shape, dtype=np.float32))
        if qtype == "F32":
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, gq), raw_dtype=gq)

    def norm(name, n):
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)))

    mat("token_embd.weight", (cfg["n_vocab"], d))
    norm("output_norm.weight", d)
    if longrope:
        # LongRoPE rescales each rotary frequency by a factor >= 1; long and short lists differ
        w.add_tensor("rope_factors_long.weight",
                     np.sort(rng.uniform(1.0, 8.0, hd // 2)).astype(np.float32))
        w.add_tensor("rope_factors_short.weight",
                     np.sort(rng.uniform(1.0, 2.0, hd // 2)).astype(np.float32))
    for i in range(L):
        p = f"blk.{i}."
        norm(p + "attn_norm.weight", d)
        mat(p + "attn_q.weight", (H * hd, d))
        mat(p + "attn_k.weight", (KVH * hd, d))
        mat(p + "attn_v.weight", (KVH * hd, d))
        mat(p + "attn_output.weight", (d, H * hd))
        norm(p + "ffn_norm.weight", d)
        if E:
            w.add_tensor(p + "ffn_gate_inp.weight",
                         std * rng.standard_normal((E, d), dtype=np.float32))
            mat(p + "ffn_gate_exps.weight", (E, ff, d))
            mat(p + "ffn_up_exps.weight", (E, ff, d))
            mat(p + "ffn_down_exps.weight", (E, d, ff))
        else:
            mat(p + "ffn_gate.weight", (ff, d))
            mat(p + "ffn_up.weight", (ff, d))
            mat(p + "ffn_down.weight", (d, ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a synthetic MiniCPM GGUF.")
    p.add_argument("preset", choices=list(PRESETS))
    p.add_argument("output")
    p.add_argument("--qtype", default="Q4_0", choices=["Q4_0", "Q8_0", "F32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--longrope", action="store_true", help="add LongRoPE factor tensors")
    a = p.parse_args(argv)
    write(a.output, a.preset, a.qtype, a.seed, longrope=a.longrope)


if __name__ == "__main__":
    main()
