"""What every model file shares: weights by GGUF name, cache construction, the output head."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from pocketlm import nn
from pocketlm.nn.kvcache import KVCache, LayerCache


def meta_get(meta: dict):
    """Lookup of ``{arch}.key`` in GGUF metadata; a missing key without default is an error."""
    arch = meta.get("general.architecture", "")
    missing = object()

    def get(key: str, default=missing):
        v = meta.get(f"{arch}.{key}", default)
        if v is missing:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        return v
    return get


def rope_linear_scale(get) -> float:
    """RoPE frequency scale: 1/factor for linear scaling, else 1 (``get`` from ``meta_get``)."""
    if get("rope.scaling.type", "none") != "linear":
        return 1.0
    factor = get("rope.scaling.factor", 1.0)
    return 1.0 / factor if factor else 1.0


def swa_layers(pattern, n_layer: int, dense_first: bool) -> tuple[bool, ...]:
    """Which layers use sliding-window attention, as llama.cpp's ``set_swa_pattern`` reads
    ``attention.sliding_window_pattern``: an explicit per-layer array, or a period in which one
    layer is dense (the first of each period if ``dense_first``, else the last); 0 = all slide."""
    if not isinstance(pattern, (int, np.integer)):
        return tuple(bool(b) for b in pattern)
    if dense_first:
        return tuple(pattern == 0 or i % pattern != 0 for i in range(n_layer))
    return tuple(pattern == 0 or i % pattern < pattern - 1 for i in range(n_layer))


def load_weights(gguf_file) -> SimpleNamespace:
    """Tensors by GGUF name: ``w.token_embd``, ``w.blk[i].attn_q`` (``attn_q_b`` for
    ``attn_q.bias``, ``attn_q_scale`` for ``attn_q.scale``) …

    1-D float32 tensors (norms, biases) become float32 arrays; everything else a QTensor whose
    blocks stay memory-mapped.
    """
    top: dict = {}
    blocks: dict[int, dict] = {}
    for name, info in gguf_file.tensors.items():
        parts = name.split(".")
        if parts[-1] == "weight":
            key = parts[-2]
        elif parts[-1] == "bias":
            key = parts[-2] + "_b"
        elif parts[-1] == "scale":  # llama.cpp's name for a weight's scale vector
            key = parts[-2] + "_scale"
        else:
            key = parts[-1]
        if len(info.shape) == 1 and info.qtype == "F32":
            value = gguf_file.raw(name).view(np.float32).reshape(info.shape)
        else:
            value = gguf_file.tensor(name)
        if parts[0] == "blk":
            blocks.setdefault(int(parts[1]), {})[key] = value
        else:
            top[key] = value
    n = len(blocks)
    if sorted(blocks) != list(range(n)):
        raise ValueError(f"{gguf_file.path}: layer tensors are not numbered 0..{n - 1}")
    top["blk"] = [SimpleNamespace(**blocks[i]) for i in range(n)]
    return SimpleNamespace(**top)


class BaseModel:
    """A decoder: ``forward_hidden`` (per model file) then the output head (here)."""

    def __init__(self, args, weights: SimpleNamespace):
        self.args = args
        self.w = weights
        if len(weights.blk) != args.n_layer:
            raise ValueError(f"model has {len(weights.blk)} layers, metadata says {args.n_layer}")
        for name in self.required_tensors():
            if not hasattr(weights, name) and not hasattr(weights.blk[0], name):
                raise ValueError(f"model lacks tensor {name}")
        self.output = getattr(weights, "output", None) or weights.token_embd  # tied head

    def required_tensors(self) -> tuple[str, ...]:
        return ("token_embd", "output_norm")

    def layer_windows(self) -> list[int]:
        """Sliding-window size per layer (0: global attention)."""
        raise NotImplementedError

    def new_cache(self, n_ctx: int, chunk: int = 512) -> KVCache:
        a = self.args
        return KVCache([LayerCache(a.n_head_kv, a.head_dim, n_ctx, w, chunk)
                        for w in self.layer_windows()], n_ctx)

    def forward_hidden(self, ids: np.ndarray, positions: np.ndarray, cache: KVCache) -> np.ndarray:
        raise NotImplementedError

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """(n, n_embd) final hidden states → (n, n_vocab) logits."""
        return nn.linear(self.output, hidden)

    def forward(self, ids: np.ndarray, positions: np.ndarray, cache: KVCache,
                n_logits: int = 1) -> np.ndarray | None:
        """Run ``ids`` at ``positions`` through the model, extending ``cache``.

        Returns float32 logits (n_logits, n_vocab) of the last ``n_logits`` tokens (None: none).
        """
        h = self.forward_hidden(ids, positions, cache)
        return self.logits(h[len(h) - n_logits:]) if n_logits > 0 else None
