"""Synthetic `embbert` models: random weights at EmbBERT-Q shapes (no trained weights are
published), one tensor plan used two ways:

- ``build`` plugs the architecture into ``tools.synth`` (``pocketlm synth embbert OUT``):
  F32 or F16 weights, the vocabulary copied from another GGUF (its size sets the token table);
- ``write`` draws the same plan into a state dict in the authors' key layout and writes it
  through the converter (tools.convert_embbert), which adds the int8 format, labels and an
  embedded HF tokenizer; the paper-shaped memory figures come from these files.

Presets (V/L/d/r/fe/K/N from the spec): ``embbert-test`` (small, for tests), ``embbert-nano``,
``embbert-tiny``, ``embbert`` (the paper's main model), ``embbert-med``, ``embbert-big``.
Initialisation follows torch's defaults (embeddings N(0, 1), linear and conv weights and biases
U(±1/sqrt(fan_in))), norm gains 1 + N(0, 0.1²), λ vectors N(0, 0.1²). The same seed gives the
same values on both paths.

    python -m tools.synth_embbert embbert out.gguf [--type int8] [--labels 2] [--seed 0]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pocketlm.tools.convert_embbert import ARCH, TYPES, authors_name, metadata, state_to_gguf

PRESETS = {  # V, L, d, r, fe, K, N; C = classifier outputs
    "embbert-test": dict(vocab=96, ctx=48, d=32, r=8, fe=1, kernel=8, n_layer=2, n_labels=2),
    "embbert-nano": dict(vocab=2048, ctx=256, d=64, r=16, fe=1, kernel=8, n_layer=2, n_labels=2),
    "embbert-tiny": dict(vocab=2048, ctx=256, d=128, r=16, fe=1, kernel=16, n_layer=2,
                         n_labels=2),
    "embbert": dict(vocab=8192, ctx=256, d=128, r=16, fe=1, kernel=32, n_layer=4, n_labels=2),
    "embbert-med": dict(vocab=8192, ctx=512, d=256, r=16, fe=2, kernel=32, n_layer=6,
                        n_labels=2),
    "embbert-big": dict(vocab=16384, ctx=1024, d=512, r=32, fe=2, kernel=64, n_layer=6,
                        n_labels=2),
}


def _uniform(fan_in: int):
    b = 1.0 / np.sqrt(fan_in)
    return lambda rng, shape: rng.uniform(-b, b, shape).astype(np.float32)


def _normal(std: float, mean: float = 0.0):
    return lambda rng, shape: (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
                               + np.float32(mean))


def plan(c: dict) -> list[tuple[str, tuple[int, ...], object]]:
    """(GGUF name, numpy shape as stored, init(rng, shape)) of every tensor, in file order."""
    V, L, d, r, K = c["vocab"], c["ctx"], c["d"], c["r"], c["kernel"]
    inner = d * c["fe"]
    out = [("token_embd.weight", (V, r), _normal(1.0)),
           ("token_embd_proj.weight", (d, r), _uniform(r)),
           ("position_embd.weight", (L, r), _normal(1.0)),
           ("position_embd_proj.weight", (d, r), _uniform(r)),
           ("token_types.weight", (3, d), _normal(1.0))]
    for i in range(c["n_layer"]):
        b = f"blk.{i}."
        out.append((b + "attn_norm.weight", (d,), _normal(0.1, 1.0)))
        out += [(b + f"lambda_{k}.weight", (d,), _normal(0.1)) for k in ("q1", "k1", "q2", "k2")]
        for name, cols in (("attn_q", d), ("attn_output", d), ("conv_out", inner)):
            out += [(b + name + ".weight", (d, cols), _uniform(cols)),
                    (b + name + ".bias", (d,), _uniform(cols))]
        out += [(b + "conv.weight", (inner, K), _uniform(K)), (b + "conv.bias", (inner,), _uniform(K))]
    n = c["n_labels"]
    return out + [("cls.weight", (n, d), _uniform(d)), ("cls.bias", (n,), _uniform(d))]


def build(c: dict, opts, n_vocab: int):
    """``tools.synth`` plug-in: F32/F16 weights; the token table takes the copied vocabulary."""
    from pocketlm.tools.synth import SynthModel, TensorSpec
    if opts.qtype not in ("F32", "F16"):
        raise ValueError(f"embbert synthesizes F32 or F16 here; for int8 use "
                         f"`python -m tools.synth_embbert PRESET OUT --type int8` "
                         f"(not {opts.qtype})")
    if opts.sliding_window or opts.down_transposed:
        raise ValueError("embbert has no sliding window and no expert layout options")
    c = {**c, "vocab": n_vocab}
    meta = metadata(n_ctx=c["ctx"], n_embd=c["d"], n_layer=c["n_layer"],
                    n_inner=c["d"] * c["fe"], conv_kernel=c["kernel"], n_vocab=n_vocab)
    tensors = [TensorSpec(name, shape, opts.qtype if len(shape) > 1 else "F32", init)
               for name, shape, init in plan(c)]
    return SynthModel(ARCH, meta, tensors)


def random_state(preset: str = "embbert-test", seed: int = 0, n_labels: int | None = None,
                 ) -> dict[str, np.ndarray]:
    """The plan drawn as a float32 state dict with the authors' keys, in plan order from one
    ``default_rng(seed)`` stream (``tools.synth`` draws the same values)."""
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: expected one of {', '.join(PRESETS)}")
    c = dict(PRESETS[preset])
    if n_labels is not None:
        c["n_labels"] = n_labels
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape, init in plan(c):
        v = init(rng, shape)
        state[authors_name(name)] = v[:, None, :] if name.endswith("conv.weight") else v
    return state


def write(path: str | Path, preset: str = "embbert-test", qtype: str = "f32", seed: int = 0,
          n_labels: int | None = None, **kwargs) -> dict[str, np.ndarray]:
    """Write a random-weight GGUF through the converter; returns the float32 state dict it was
    made from. ``kwargs`` go to ``state_to_gguf`` (labels, tokenizer_json, cls_prefix, eps)."""
    state = random_state(preset, seed, n_labels)
    state_to_gguf(state, path, qtype, name=f"EmbBERT-Q synthetic {preset}", **kwargs)
    return state


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.synth_embbert",
                                description="Random-weight EmbBERT-Q GGUF at a preset's shape.")
    p.add_argument("preset", choices=sorted(PRESETS))
    p.add_argument("out", help="output .gguf path")
    p.add_argument("--type", default="f32", choices=TYPES)
    p.add_argument("--labels", type=int, default=None, help="classifier outputs (default 2)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    write(a.out, a.preset, a.type, a.seed, a.labels)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
