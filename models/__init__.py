"""Model registry: GGUF ``general.architecture`` → the module implementing it."""
from __future__ import annotations

import importlib

ARCHITECTURES = {
    "llama": "pocketlm.models.llama",
    "qwen2": "pocketlm.models.qwen2",
    "gemma3": "pocketlm.models.gemma3",
    "smallthinker": "pocketlm.models.smallthinker",
    "embbert": "pocketlm.models.embbert",
    "bert": "pocketlm.models.bert",
    "minicpm": "pocketlm.models.minicpm",
    "qwen3moe": "pocketlm.models.qwen3moe",
    "qwen2moe": "pocketlm.models.qwen2moe",
    "olmoe": "pocketlm.models.olmoe",
    "granitemoe": "pocketlm.models.granitemoe",
    "gpt-oss": "pocketlm.models.gpt_oss",
}


def load_model(gguf_file):
    """Build the model for an open GGUF file (weights stay memory-mapped)."""
    from pocketlm.gguf.reader import naming_file
    from pocketlm.models.base import check_tokenizer, load_weights
    arch = gguf_file.arch
    if arch not in ARCHITECTURES:
        raise ValueError(f"{gguf_file.path}: unsupported architecture {arch!r} "
                         f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    mod = importlib.import_module(ARCHITECTURES[arch])
    with naming_file(gguf_file.path):
        check_tokenizer(gguf_file.metadata)
        args = mod.ModelArgs.from_gguf(gguf_file.metadata)
        weights = load_weights(gguf_file, args.tensor_types)
        args.check(weights)   # shapes against the metadata, before any kernel sees them
        return mod.Model(args, weights)
