"""Summaries of a GGUF file for `pocketlm inspect`: architecture, size, types, hyper-parameters."""
from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from pocketlm.gguf.reader import GGUFFile

# Hyper-parameter keys worth showing, relative to the architecture prefix.
_HPARAMS = (
    "context_length", "embedding_length", "block_count", "feed_forward_length",
    "expert_feed_forward_length", "attention.head_count", "attention.head_count_kv",
    "attention.key_length", "attention.value_length", "attention.sliding_window",
    "attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon", "rope.dimension_count",
    "rope.freq_base", "rope.scaling.type", "rope.scaling.factor", "expert_count",
    "expert_used_count", "expert_gating_func", "vocab_size", "embedding_scale",
    "residual_scale", "logit_scale", "pooling_type", "conv_kernel",
)


def summarize(g: GGUFFile) -> dict[str, Any]:
    """A JSON-friendly summary of the file."""
    arch = g.arch
    types = Counter(t.qtype for t in g.tensors.values())
    type_bytes = Counter()
    for t in g.tensors.values():
        type_bytes[t.qtype] += t.nbytes
    hp = {}
    for k in _HPARAMS:
        v = g.metadata.get(f"{arch}.{k}")
        if v is not None:
            hp[k] = v.tolist() if isinstance(v, np.ndarray) else v
    tok = g.metadata.get("tokenizer.ggml.tokens")
    return {
        "path": g.path,
        "file_size": g.file_size,
        "gguf_version": g.version,
        "architecture": arch,
        "name": g.metadata.get("general.name"),
        "n_tensors": len(g.tensors),
        "n_params": sum(t.n_elements for t in g.tensors.values()),
        "tensor_types": dict(sorted(types.items())),
        "tensor_type_bytes": dict(sorted(type_bytes.items())),
        "hparams": hp,
        "tokenizer": {
            "model": g.metadata.get("tokenizer.ggml.model"),
            "pre": g.metadata.get("tokenizer.ggml.pre"),
            "n_vocab": len(tok) if tok is not None else None,
            "has_chat_template": "tokenizer.chat_template" in g.metadata,
        },
    }


def format_summary(s: dict[str, Any]) -> str:
    def human(n: float) -> str:
        for unit in ("B", "KiB", "MiB", "GiB"):
            if n < 1024 or unit == "GiB":
                return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
            n /= 1024
        return str(n)

    lines = [
        f"file          {s['path']}",
        f"size          {human(s['file_size'])} (GGUF v{s['gguf_version']})",
        f"architecture  {s['architecture']}",
        f"name          {s['name']}",
        f"parameters    {s['n_params'] / 1e6:.1f} M in {s['n_tensors']} tensors",
        "tensor types  " + ", ".join(
            f"{k}: {n} ({human(s['tensor_type_bytes'][k])})" for k, n in s["tensor_types"].items()),
    ]
    t = s["tokenizer"]
    if t["model"]:
        lines.append(f"tokenizer     {t['model']} (pre {t['pre']}), {t['n_vocab']} tokens, "
                     f"chat template: {'yes' if t['has_chat_template'] else 'no'}")
    for k, v in s["hparams"].items():
        lines.append(f"  {k:<34} {v}")
    return "\n".join(lines)
