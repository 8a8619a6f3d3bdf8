"""Requantize a GGUF model to another ftype, following llama.cpp's ``llama_model_quantize``.

Reproduces what llama.cpp does with ``allow_requantize``, no importance matrix and default
options, for the legacy ftypes (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and the float ones:

* which tensors are quantized (``tensor_allows_quantization``): 2-D+ ``*weight`` tensors except
  norms, expert gates, positional embeddings and a few small special weights;
* each tensor's type (``llama_tensor_get_type``): the ftype's type, except the output matrix
  (or ``token_embd`` when it doubles as the output) which gets Q6_K, or Q8_0 when its row
  length does not fit the ftype's block or the ftype is Q8_0; 8-expert models keep attn_k/attn_v
  at Q8_0; a type whose block does not divide the row falls back (Q6_K -> Q8_0, ...);
* a tensor already of its target type is copied byte for byte; others are dequantized to
  float32 and quantized with ggml's reference row quantizer;
* tensor order: non-layer tensors first, then by layer number, by name within a layer;
* metadata copied verbatim with ``general.quantization_version`` and ``general.file_type`` moved
  to the end, split keys dropped; GGUF v3, data aligned to ``general.alignment`` (default 32).

With these rules the output is byte-identical to llama.cpp's file for our models.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGUFValueType

from pocketlm import quant
from pocketlm.gguf.reader import GGUFFile, open_gguf
from pocketlm.gguf.writer import KV, Tensor, copy_kv, write_gguf

ProgressFn = Callable[[int, int], None]  # (tensors done, tensors total)

# llama_ftype values written to general.file_type
FTYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "BF16": 32}
GGML_QNT_VERSION = 2

_QUANTIZED = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
              "Q8_K"}
# tensor_type_fallback: a 256-block type that does not fit the row length drops to a 32-block one
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_DROPPED_KEYS = ("split.no", "split.count", "split.tensors.count")

# substrings that keep a weight in its source type (tensor_allows_quantization)
_KEEP_SUBSTRINGS = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight",
    "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
    "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
    "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd",
    "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook",
    "mm.a.code_embd",
)
_KEEP_NAMES = ("position_embd.weight", "token_types.weight")


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of the output file, in output order."""

    name: str
    shape: tuple[int, ...]   # numpy order
    src_type: str
    dst_type: str

    @property
    def requantized(self) -> bool:
        return self.src_type != self.dst_type


def _layer(name: str) -> int:
    m = re.match(r"blk\.\s*([+-]?\d+)", name)   # sscanf(name, "blk.%d.", &layer)
    return int(m.group(1)) if m else -1


def _order_key(name: str):
    # llama_model_loader::weight_name_comparer, which orders the quantizer's tensor map
    return (_layer(name), name.encode("utf-8"))


def _n_dims(ne: tuple[int, ...]) -> int:
    """ggml_n_dims: trailing dimensions of size 1 do not count."""
    n = len(ne)
    while n > 1 and ne[n - 1] == 1:
        n -= 1
    return n


def _allows_quantization(name: str, ne: tuple[int, ...]) -> bool:
    if _n_dims(ne) < 2 or not name.endswith("weight"):
        return False
    if name in _KEEP_NAMES:
        return False
    return not any(s in name for s in _KEEP_SUBSTRINGS)


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key in ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight", "attn_k.weight"):
        if key in name:
            return key.split(".")[0]
    return "other"


def _target_type(name: str, ne: tuple[int, ...], default: str, arch: str, n_expert: int,
                 tied: bool) -> str:
    """llama_tensor_get_type for the ftypes supported here (no imatrix, no overrides)."""
    if default not in _QUANTIZED:
        return default
    new = default
    cat = _category(name)
    if cat == "output" or (tied and cat == "token_embd"):
        if arch == "falcon" or ne[0] % quant.block_size(new):
            new = "Q8_0"
        elif new != "Q8_0":
            new = "Q6_K"
    elif cat in ("attn_v", "attn_qkv", "attn_kv_b", "attn_k") and n_expert == 8:
        new = "Q8_0"   # "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
    if ne[0] % quant.block_size(new):
        fallback = _FALLBACK.get(new, new)
        if ne[0] % quant.block_size(fallback):
            fallback = "F16"
        new = fallback
    return new


def plan_tensors(src: GGUFFile, qtype: str) -> list[TensorPlan]:
    """The output tensors of ``requantize(src, ..., qtype)`` in file order, with their types."""
    if qtype not in FTYPES:
        raise ValueError(f"unsupported target type {qtype!r} (supported: {', '.join(FTYPES)})")
    arch = src.arch
    n_expert = int(src.metadata.get(f"{arch}.expert_count", 0) or 0)
    tied = "output.weight" not in src.tensors
    plans = []
    for name in sorted(src.tensors, key=_order_key):
        t = src.tensors[name]
        ne = tuple(reversed(t.shape))
        dst = t.qtype
        if _allows_quantization(name, ne):
            dst = _target_type(name, ne, qtype, arch, n_expert, tied)
        plans.append(TensorPlan(name, t.shape, t.qtype, dst))
    return plans


def requantize(src_path: str | os.PathLike, dst_path: str | os.PathLike, qtype: str,
               progress: ProgressFn | None = None) -> dict:
    """Write ``dst_path``: the GGUF model at ``src_path`` converted to ftype ``qtype``.

    ``qtype`` is one of ``FTYPES`` (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, F16, BF16, F32). Tensors are
    streamed one at a time; the file appears under its final name only once complete.
    ``progress(done, total)`` is called after each tensor. Returns a summary dict:
    ``path``, ``ftype``, ``size_bytes``, ``n_tensors``, ``n_requantized``, ``n_copied`` and
    ``types`` (tensor name -> output type).
    """
    dst_path = Path(dst_path)
    with open_gguf(src_path) as src:
        plans = plan_tensors(src, qtype)
        for p in plans:
            if p.requantized and p.dst_type not in quant.QUANTIZE_QTYPES:
                raise ValueError(f"{p.name}: llama.cpp would store it as {p.dst_type}, and "
                                 f"quantizing to {p.dst_type} is not implemented")
            if p.requantized and p.src_type not in quant.QTYPES:
                raise ValueError(f"{p.name}: cannot dequantize source type {p.src_type}")
        kv = copy_kv(src, lambda k: k not in ("general.quantization_version",
                                              "general.file_type", *_DROPPED_KEYS))
        kv += [KV("general.quantization_version", GGUFValueType.UINT32, GGML_QNT_VERSION),
               KV("general.file_type", GGUFValueType.UINT32, FTYPES[qtype])]
        write_gguf(dst_path, kv, [_tensor(src, p) for p in plans], progress)
    return {
        "path": str(dst_path),
        "ftype": qtype,
        "size_bytes": dst_path.stat().st_size,
        "n_tensors": len(plans),
        "n_requantized": sum(p.requantized for p in plans),
        "n_copied": sum(not p.requantized for p in plans),
        "types": {p.name: p.dst_type for p in plans},
    }


def _tensor(src: GGUFFile, p: TensorPlan) -> Tensor:
    """The output tensor: copied as it is, or streamed through ``_convert``."""
    raw = src.raw(p.name)
    ne = tuple(reversed(p.shape))
    # ggml_n_dims: trailing ggml dimensions of size 1 are not written
    shape = tuple(reversed(ne[:_n_dims(ne)]))
    return Tensor(p.name, p.dst_type, shape, _convert(raw, p) if p.requantized else raw)


# Rows converted per step: bounds the float32 temporaries (like llama.cpp's slabs).
_SLAB_ELEMS = 1 << 22


def _convert(raw: np.ndarray, p: TensorPlan):
    """Yield the target rows for slabs of source rows (rows, src_row_bytes), via float32."""
    cols = p.shape[-1]
    step = max(1, _SLAB_ELEMS // cols)
    for r in range(0, raw.shape[0], step):
        chunk = raw[r:r + step]
        yield quant.quantize(p.dst_type, quant.dequantize(p.src_type, chunk, (chunk.shape[0], cols)))
