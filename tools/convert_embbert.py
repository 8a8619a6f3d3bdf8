"""EmbBERT-Q checkpoints in the authors' layout (safetensors of their HF ``SequenceClassifier``)
to GGUF arch ``embbert`` (docs/embbert-gguf.md), as f32, f16 or int8
(``pocketlm convert --arch embbert SRC OUT --type int8``).

int8 is the spec's deployment target: every linear layer (expanders, query, att_output,
contract, classifier) as I8 rows with one F32 scale per output row (W ≈ q · scale,
q = round(127 · W / max|W_row|)); embedding tables, conv, norms, λ vectors and biases in F16.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from pocketlm.gguf.writer import KV, Tensor, write_gguf
from pocketlm.quant.convert import read_safetensors

ARCH = "embbert"
TYPES = ("f32", "f16", "int8")
F32_EPS = float(np.finfo(np.float32).eps)   # torch nn.RMSNorm(eps=None) in float32
# Spec §2: [PAD]=0, [UNK]=1, [CLS]=2, [MASK]=3, [SEP]=4
SPECIAL = {"[PAD]": ("padding", 0), "[UNK]": ("unknown", 1), "[CLS]": ("bos", 2),
           "[SEP]": ("seperator", 4)}

_TOP = {"model.embedder.token.weight": "token_embd.weight",
        "model.embedder.tok_expander.weight": "token_embd_proj.weight",
        "model.embedder.position.weight": "position_embd.weight",
        "model.embedder.pos_expander.weight": "position_embd_proj.weight",
        "model.embedder.sentence.weight": "token_types.weight",
        "classifier.weight": "cls.weight", "classifier.bias": "cls.bias"}
_LAYER = {"norms.{i}.weight": "attn_norm.weight",
          "attentions.{i}.query.weight": "attn_q.weight",
          "attentions.{i}.query.bias": "attn_q.bias",
          "attentions.{i}.att_output.weight": "attn_output.weight",
          "attentions.{i}.att_output.bias": "attn_output.bias",
          "attentions.{i}.contract.weight": "conv_out.weight",
          "attentions.{i}.contract.bias": "conv_out.bias",
          "attentions.{i}.conv1d.weight": "conv.weight",
          "attentions.{i}.conv1d.bias": "conv.bias",
          **{f"attentions.{{i}}.lambda_{k}": f"lambda_{k}.weight" for k in ("q1", "k1", "q2", "k2")}}
# weights that become int8 (nn.Linear in the authors' model)
LINEARS = re.compile(r"(token_embd_proj|position_embd_proj|blk\.\d+\.(attn_q|attn_output|conv_out)"
                     r"|cls)\.weight$")

def authors_name(gguf_name: str) -> str:
    """The authors' state-dict key of a GGUF tensor name (the inverse of the conversion)."""
    for k, v in _TOP.items():
        if v == gguf_name:
            return k
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    for k, v in _LAYER.items():
        if m and v == m.group(2):
            return "model." + k.replace("{i}", m.group(1))
    raise ValueError(f"{gguf_name!r} is not an embbert tensor")


def metadata(*, n_ctx: int, n_embd: int, n_layer: int, n_inner: int, conv_kernel: int,
             n_vocab: int, eps: float = F32_EPS) -> list[tuple[str, object, str]]:
    """The architecture's metadata, (key, value, type "u32" | "f32") in file order."""
    p = f"{ARCH}."
    return [(p + "context_length", n_ctx, "u32"), (p + "embedding_length", n_embd, "u32"),
            (p + "block_count", n_layer, "u32"), (p + "feed_forward_length", n_inner, "u32"),
            (p + "conv_kernel", conv_kernel, "u32"), (p + "vocab_size", n_vocab, "u32"),
            (p + "attention.head_count", 1, "u32"),
            (p + "attention.layer_norm_rms_epsilon", eps, "f32")]


def _rename(state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """Authors' keys -> GGUF names; conv1d (C, 1, K) -> (C, K). Returns (tensors, n_layer)."""
    layer_keys = {}
    for k in state:
        m = re.fullmatch(r"model\.(norms|attentions)\.(\d+)\.(.+)", k)
        if m:
            layer_keys[k] = (int(m.group(2)), f"{m.group(1)}.{{i}}.{m.group(3)}")
    n_layer = 1 + max((i for i, _ in layer_keys.values()), default=-1)
    out = {}
    for k, v in state.items():
        if k in _TOP:
            out[_TOP[k]] = v
        elif k in layer_keys and layer_keys[k][1] in _LAYER:
            i, pat = layer_keys[k]
            out[f"blk.{i}.{_LAYER[pat]}"] = v
        else:
            hint = " (a pre-training checkpoint has no task head)" if "mlm_" in k or "nsp_" in k else ""
            raise ValueError(f"unexpected tensor {k!r} for EmbBERT-Q{hint}")
    need = list(_TOP.values()) + [f"blk.{i}.{n}" for i in range(n_layer) for n in _LAYER.values()]
    missing = [n for n in need if n not in out]
    if missing or n_layer == 0:
        raise ValueError(f"checkpoint lacks {', '.join(missing[:4]) or 'every encoder layer'}"
                         + (" …" if len(missing) > 4 else ""))
    for i in range(n_layer):
        w = out[f"blk.{i}.conv.weight"]
        if w.ndim != 3 or w.shape[1] != 1:
            raise ValueError(f"blk.{i}.conv.weight: expected a depthwise conv (C, 1, K), got {w.shape}")
        out[f"blk.{i}.conv.weight"] = w[:, 0, :]
    return out, n_layer


def quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: (q int8, scale float32) with w ≈ q * scale[:, None]."""
    w = np.asarray(w, np.float64)
    amax = np.abs(w).max(axis=1)
    scale = amax / 127.0
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(amax[:, None] > 0, np.rint(w / scale[:, None]), 0)
    return q.astype(np.int8), scale.astype(np.float32)


def _special_ids(tokenizer_json: str | None) -> dict[str, int]:
    ids = {role: i for role, i in SPECIAL.values()}
    if tokenizer_json:
        for t in json.loads(tokenizer_json).get("added_tokens", []):
            if t.get("content") in SPECIAL:
                ids[SPECIAL[t["content"]][0]] = int(t["id"])
    return ids


def state_to_gguf(state: dict[str, np.ndarray], out: str | Path, qtype: str = "f32", *,
                  labels: list[str] | None = None, tokenizer_json: str | None = None,
                  cls_prefix: bool = False, eps: float = F32_EPS,
                  name: str = "EmbBERT-Q") -> dict:
    """Write a GGUF from a state dict in the authors' key layout; returns a summary dict."""
    if qtype not in TYPES:
        raise ValueError(f"type {qtype!r}: expected one of {', '.join(TYPES)}")
    tensors, n_layer = _rename({k: np.asarray(v, np.float32) for k, v in state.items()})
    V, r = tensors["token_embd.weight"].shape
    L = tensors["position_embd.weight"].shape[0]
    d = tensors["token_types.weight"].shape[1]
    C, K = tensors["blk.0.conv.weight"].shape
    n_cls = tensors["cls.weight"].shape[0]
    if labels is not None and len(labels) != n_cls:
        raise ValueError(f"{len(labels)} labels given for a head of {n_cls} outputs")
    kv = [KV("general.architecture", "str", ARCH), KV("general.name", "str", name)]
    kv += [KV(key, vtype, value) for key, value, vtype in metadata(
        n_ctx=L, n_embd=d, n_layer=n_layer, n_inner=C, conv_kernel=K, n_vocab=V, eps=eps)]
    if labels:
        kv.append(KV(f"{ARCH}.classifier.output_labels", "array", list(labels), "str"))
    ids = _special_ids(tokenizer_json)
    kv += [KV("tokenizer.ggml.padding_token_id", "u32", ids["padding"]),
           KV("tokenizer.ggml.unknown_token_id", "u32", ids["unknown"]),
           KV("tokenizer.ggml.bos_token_id", "u32", ids["bos"]),
           KV("tokenizer.ggml.seperator_token_id", "u32", ids["seperator"]),
           KV("tokenizer.ggml.add_bos_token", "bool", bool(cls_prefix))]
    if tokenizer_json:
        kv.append(KV("tokenizer.huggingface.json", "str", tokenizer_json))
    stored = []   # (name, type, array) in file order
    for gname, v in tensors.items():
        if qtype == "int8" and LINEARS.match(gname):
            q, scale = quantize_rows(v)
            stored += [(gname, "I8", q), (gname[:-len("weight")] + "scale", "F32", scale)]
        elif qtype == "f32":
            stored.append((gname, "F32", v))
        else:
            stored.append((gname, "F16", v.astype(np.float16)))
    write_gguf(out, kv, [Tensor(n, t, a.shape, a) for n, t, a in stored])
    n_bytes = sum(a.nbytes for _, _, a in stored)
    return {"path": str(out), "type": qtype, "n_layer": n_layer, "n_vocab": V, "n_ctx": L,
            "n_embd": d, "n_labels": n_cls, "tensor_bytes": n_bytes,
            "n_params": int(sum(v.size for v in tensors.values()))}


def convert(src: str | Path, out: str | Path, qtype: str = "f32", *,
            labels: list[str] | None = None, tokenizer: str | Path | None = None,
            cls_prefix: bool = False, eps: float = F32_EPS) -> dict:
    """Convert ``src`` (a model.safetensors, or a folder holding one and optionally
    tokenizer.json) to ``out``. ``tokenizer``: an HF tokenizers JSON to embed."""
    src = Path(src)
    st = src / "model.safetensors" if src.is_dir() else src
    if not st.is_file():
        raise ValueError(f"{src}: no model.safetensors")
    if tokenizer is None and src.is_dir() and (src / "tokenizer.json").is_file():
        tokenizer = src / "tokenizer.json"
    tok_json = Path(tokenizer).read_text(encoding="utf-8") if tokenizer else None
    return state_to_gguf(read_safetensors(st), out, qtype, labels=labels,
                         tokenizer_json=tok_json, cls_prefix=cls_prefix, eps=eps,
                         name=src.stem if not src.is_dir() else src.name)

