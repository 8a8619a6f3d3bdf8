"""Make llama.cpp reference logits for the tiny synthetic MoE models (qwen3moe, qwen2moe,
Mixtral-style llama, olmoe, granitemoe, gpt-oss).

The models are written by ``tools.synth`` (each architecture's ``-tiny`` preset, fixed seed,
Q4_0, the 512-token vocabulary of ``synth_minicpm.vocab_gguf``); llama.cpp runs in a separate
Python environment that has ``llama-cpp-python`` (never a dependency of this project):

    python -m tools.moe_reference --llama-python /path/to/venv/bin/python --out tests/data

It writes ``moe-reference.json`` and ``moe-reference.npz`` as ``tools.minicpm_reference``
does; ``tests/test_moe_models.py`` regenerates the models, checks their sha256 and compares.
"""
from __future__ import annotations

import sys
from pathlib import Path

from pocketlm.tools import synth_minicpm
from pocketlm.tools.minicpm_reference import reference_main

# model name -> (preset, shape overrides); std 0.1 so that routing and norms matter
MODELS = {
    "qwen3moe": ("qwen3moe-tiny", dict(std=0.1)),
    "qwen2moe": ("qwen2moe-tiny", dict(std=0.1)),
    # without q/k norms attention is sharper at std 0.1: 8-bit activations alone move the
    # logits 0.2 there (in llama.cpp and here alike), so a smaller init
    "mixtral": ("mixtral-tiny", dict(std=0.07)),
    "olmoe": ("olmoe-tiny", dict(std=0.1)),
    "granitemoe": ("granitemoe-tiny", dict(std=0.1)),
    # no q/k norms either, and experts in MXFP4 (as the released files)
    "gpt-oss": ("gpt-oss-tiny", dict(std=0.07)),
}
SEED = 1
RUNS = {m: (m, 256) for m in MODELS}


def make_model(name: str, directory: Path) -> Path:
    """Write model ``name`` into ``directory`` unless already there."""
    from pocketlm.tools.synth import Options, synthesize
    preset, overrides = MODELS[name]
    path = Path(directory) / f"{name}-tiny-synthetic-Q4_0.gguf"
    if not path.exists():
        vocab = Path(directory) / "minicpm-vocab-512.gguf"
        if not vocab.exists():
            synth_minicpm.vocab_gguf(vocab)
        synthesize(preset, path, Options(seed=SEED, qtype="Q4_0", recipe="plain",
                                         name=f"{name} tiny synthetic", overrides=overrides),
                   vocab)
    return path


def main(argv=None):
    reference_main("moe", make_model, RUNS,
                   {m: {"preset": p, "seed": SEED, "overrides": o} for m, (p, o) in MODELS.items()},
                   argv)


if __name__ == "__main__":
    sys.exit(main())
