"""Hugging Face BERT checkpoint -> GGUF that llama.cpp's ``bert`` architecture loads.

Writes the metadata keys and tensor names llama.cpp's converter (``convert_hf_to_gguf.py``,
class ``BertModel``) writes, with its type rules: 1-D tensors, norms, position and token-type
embeddings stay F32; other weights take the requested type. The vocabulary is stored as
llama.cpp stores WordPiece: ``##x`` continuation pieces become ``x``, word-initial pieces get
a U+2581 prefix, control tokens stay as they are. Pooling comes from the sentence-transformers
``modules.json`` / ``*_Pooling/config.json``. One key of our own,
``sentence_transformers.max_seq_length``, keeps the checkpoint's truncation length (llama.cpp
ignores it).

Input folder: ``config.json``, ``*.safetensors`` (read here, no extra package), and
``tokenizer.json`` or ``vocab.txt``.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np

from pocketlm import quant
from pocketlm.gguf.writer import KV, Tensor, write_gguf
from pocketlm.quant.requantize import GGML_QNT_VERSION

ProgressFn = Callable[[int, int], None]   # (tensors done, tensors total)

TYPES = ("F32", "F16", "Q8_0", "Q4_0")
FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7}   # llama_ftype
POOLING = {"none": 0, "mean": 1, "cls": 2, "last": 3}   # llama_pooling_type
ARCHITECTURES = ("BertModel", "BertForMaskedLM", "BertForSequenceClassification")
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5
MAX_SEQ_KEY = "sentence_transformers.max_seq_length"
_ID_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id",
            "sep": "seperator_token_id", "pad": "padding_token_id", "cls": "cls_token_id",
            "mask": "mask_token_id"}   # llama.cpp's spelling, "seperator" included

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64,
              "I32": np.int32, "BF16": np.uint16}

_TOP = {
    "embeddings.word_embeddings": "token_embd",
    "embeddings.position_embeddings": "position_embd",
    "embeddings.token_type_embeddings": "token_types",
    "embeddings.LayerNorm": "token_embd_norm",
}
_LAYER = {
    "attention.self.query": "attn_q",
    "attention.self.key": "attn_k",
    "attention.self.value": "attn_v",
    "attention.output.dense": "attn_output",
    "attention.output.LayerNorm": "attn_output_norm",
    "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down",
    "output.LayerNorm": "layer_output_norm",
}
_SKIPPED = re.compile(r"^(embeddings\.position_ids|pooler\..*|cls\.predictions\..*|"
                      r"cls\.seq_relationship\..*)$")


class ConvertError(ValueError):
    """The input folder is not a convertible BERT checkpoint."""


# -- reading ----------------------------------------------------------------------------------
def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a .safetensors file, memory-mapped (BF16 widened to float32)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConvertError(f"{path}: not a safetensors file (too short)")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise ConvertError(f"{path}: not a safetensors file (bad header length {n})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConvertError(f"{path}: unreadable safetensors header ({e})") from None
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n, shape=(size - 8 - n,))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = _ST_DTYPES.get(info.get("dtype"))
        if dt is None:
            raise ConvertError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        if end > data.size or end - start != count * np.dtype(dt).itemsize:
            raise ConvertError(f"{path}: tensor {name} lies outside the file or has a bad size")
        a = data[start:end].view(dt).reshape(shape)
        if info["dtype"] == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        out[name] = a
    return out


def _json(path: Path) -> dict | list | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None


def gguf_name(hf_name: str) -> str | None:
    """GGUF tensor name for a Hugging Face BERT tensor name; None for tensors llama.cpp drops."""
    name = hf_name[5:] if hf_name.startswith("bert.") else hf_name
    if name.endswith(".gamma"):
        name = name[:-6] + ".weight"
    elif name.endswith(".beta"):
        name = name[:-5] + ".bias"
    if _SKIPPED.match(name):
        return None
    stem, _, suffix = name.rpartition(".")
    if suffix in ("weight", "bias"):
        if stem in _TOP:
            return f"{_TOP[stem]}.{suffix}"
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", stem)
        if m and m.group(2) in _LAYER:
            return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}.{suffix}"
    raise ConvertError(f"cannot map tensor {hf_name!r} to a llama.cpp bert tensor")


def tensor_type(name: str, shape: tuple[int, ...], qtype: str) -> str:
    """Stored type of a tensor, by llama.cpp's converter rules (and llama-quantize's for Q4_0)."""
    if (len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight")
            or name in ("position_embd.weight", "token_types.weight")):
        return "F32"
    if qtype == "Q4_0" and name == "token_embd.weight":
        # llama-quantize gives the (output-less) token table Q6_K, which we cannot write
        return "Q8_0"
    if qtype in ("Q8_0", "Q4_0") and shape[-1] % quant.block_size(qtype):
        return "F16"   # as gguf-py's QuantError fallback
    return qtype


# -- vocabulary -------------------------------------------------------------------------------
def read_vocab(hf_dir: Path, n_vocab: int) -> tuple[list[str], list[int], dict, dict]:
    """(tokens, token types, normalizer settings, special token ids) as llama.cpp writes them."""
    tok_json = _json(hf_dir / "tokenizer.json")
    cfg = _json(hf_dir / "tokenizer_config.json") or {}
    special_map = _json(hf_dir / "special_tokens_map.json") or {}
    added: dict[str, tuple[int, bool]] = {}
    norm: dict = {}
    if tok_json is not None:
        model = tok_json.get("model") or {}
        if model.get("type") != "WordPiece":
            raise ConvertError(f"{hf_dir}/tokenizer.json: model type {model.get('type')!r}, "
                               "expected WordPiece")
        vocab = dict(model["vocab"])
        for a in tok_json.get("added_tokens") or []:
            added[a["content"]] = (int(a["id"]), bool(a.get("special")))
            vocab.setdefault(a["content"], int(a["id"]))
        n = tok_json.get("normalizer") or {}
        if n.get("type") == "BertNormalizer":
            norm = {k: n[k] for k in ("lowercase", "strip_accents") if k in n}
    elif (hf_dir / "vocab.txt").is_file():
        lines = (hf_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        vocab = {t: i for i, t in enumerate(lines)}
        named = {**special_map, **{k: v for k, v in cfg.items() if k.endswith("_token")}}
        for t in named.values():
            t = t.get("content") if isinstance(t, dict) else t
            if isinstance(t, str) and t in vocab:
                added[t] = (vocab[t], True)
        if "do_lower_case" in cfg:
            norm = {"lowercase": bool(cfg["do_lower_case"])}
    else:
        raise ConvertError(f"{hf_dir}: no tokenizer.json or vocab.txt")
    if max(vocab.values()) >= n_vocab:
        raise ConvertError(f"{hf_dir}: token id {max(vocab.values())} is beyond vocab_size "
                           f"{n_vocab}")
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
        elif t in added:
            tokens.append(t)
            types.append(TOKEN_CONTROL if added[t][1] else TOKEN_USER_DEFINED)
        else:
            tokens.append(t[2:] if t.startswith("##") else "\u2581" + t)
            types.append(TOKEN_NORMAL)
    # special ids by role, from the tokenizer config (BERT has no BOS/EOS: CLS/SEP stand in)
    roles = {}
    for role in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"):
        t = cfg.get(f"{role}_token", special_map.get(f"{role}_token"))
        t = t.get("content") if isinstance(t, dict) else t
        if isinstance(t, str) and t in vocab:
            roles[role] = vocab[t]
    roles.setdefault("bos", roles.get("cls"))
    roles.setdefault("eos", roles.get("sep"))
    return tokens, types, norm, {k: v for k, v in roles.items() if v is not None}


def _pooling(hf_dir: Path) -> tuple[int | None, int | None]:
    """(llama pooling type, max_seq_length) from a sentence-transformers layout, else None."""
    modules = _json(hf_dir / "modules.json")
    pooling = None
    for m in modules or []:
        if str(m.get("type", "")).endswith("Pooling"):
            cfg = _json(hf_dir / m.get("path", "") / "config.json")
            if cfg is None:
                raise ConvertError(f"{hf_dir}: pooling module {m.get('path')!r} has no config.json")
            if cfg.get("pooling_mode_mean_tokens"):
                pooling = POOLING["mean"]
            elif cfg.get("pooling_mode_cls_token"):
                pooling = POOLING["cls"]
            elif cfg.get("pooling_mode_lasttoken"):
                pooling = POOLING["last"]
            elif cfg.get("pooling_mode") in POOLING:
                pooling = POOLING[cfg["pooling_mode"]]
            else:
                raise ConvertError(f"{hf_dir}: unsupported pooling {json.dumps(cfg)}")
            break
    st = _json(hf_dir / "sentence_bert_config.json") or {}
    max_len = st.get("max_seq_length")
    return pooling, (int(max_len) if max_len else None)


# -- conversion -------------------------------------------------------------------------------
def convert(hf_dir: str | os.PathLike, out_path: str | os.PathLike, qtype: str = "F16",
            name: str | None = None, progress: ProgressFn | None = None) -> dict:
    """Convert the BERT checkpoint in ``hf_dir`` to a GGUF at ``out_path``.

    ``qtype``: F32, F16 (llama.cpp's default), Q8_0 or Q4_0. The file appears under its final
    name only when complete. Returns a summary: ``path``, ``qtype``, ``size_bytes``,
    ``n_tensors``, ``types`` (tensor name -> stored type).
    """
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    qtype = qtype.upper()
    if qtype not in TYPES:
        raise ConvertError(f"type {qtype!r}: expected one of {', '.join(t.lower() for t in TYPES)}")
    if not hf_dir.is_dir():
        raise ConvertError(f"{hf_dir}: not a directory")
    config = _json(hf_dir / "config.json")
    if config is None:
        raise ConvertError(f"{hf_dir}: no config.json (not a Hugging Face checkpoint)")
    archs = config.get("architectures") or []
    if config.get("model_type") != "bert" and not set(archs) & set(ARCHITECTURES):
        raise ConvertError(f"{hf_dir}: model_type {config.get('model_type')!r} / architectures "
                           f"{archs} is not a BERT model")
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ConvertError(f"{hf_dir}: no .safetensors weights")
    try:
        hp = {k: int(config[k]) for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                          "num_attention_heads", "max_position_embeddings",
                                          "vocab_size")}
    except KeyError as e:
        raise ConvertError(f"{hf_dir}/config.json lacks {e.args[0]}") from None
    if config.get("hidden_act", "gelu") != "gelu":
        raise ConvertError(f"{hf_dir}: hidden_act {config['hidden_act']!r}, expected gelu")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ConvertError(f"{hf_dir}: position_embedding_type "
                           f"{config['position_embedding_type']!r}, expected absolute")

    tensors: dict[str, np.ndarray] = {}
    for f in files:
        for k, v in read_safetensors(f).items():
            g = gguf_name(k)
            if g is not None:
                tensors[g] = v
    expected = {"token_embd.weight", "position_embd.weight", "token_types.weight",
                "token_embd_norm.weight", "token_embd_norm.bias"}
    expected |= {f"blk.{i}.{t}.{s}" for i in range(hp["num_hidden_layers"])
                 for t in _LAYER.values() for s in ("weight", "bias")}
    missing = sorted(expected - set(tensors))
    if missing:
        raise ConvertError(f"{hf_dir}: checkpoint lacks {len(missing)} tensors, e.g. "
                           f"{', '.join(missing[:3])}")
    tokens, toktypes, norm, special = read_vocab(hf_dir, hp["vocab_size"])
    pooling, max_len = _pooling(hf_dir)

    p = "bert."
    kv = [KV("general.architecture", "str", "bert"),
          KV("general.name", "str", name or hf_dir.name),
          KV(p + "block_count", "u32", hp["num_hidden_layers"]),
          KV(p + "context_length", "u32", hp["max_position_embeddings"]),
          KV(p + "embedding_length", "u32", hp["hidden_size"]),
          KV(p + "feed_forward_length", "u32", hp["intermediate_size"]),
          KV(p + "attention.head_count", "u32", hp["num_attention_heads"]),
          KV(p + "attention.layer_norm_epsilon", "f32",
             float(config.get("layer_norm_eps", 1e-12))),
          KV("general.file_type", "u32", FILE_TYPE[qtype]),
          KV(p + "attention.causal", "bool", False)]
    if pooling is not None:
        kv.append(KV(p + "pooling_type", "u32", pooling))
    kv += [KV("tokenizer.ggml.token_type_count", "u32", int(config.get("type_vocab_size", 1))),
           KV("tokenizer.ggml.model", "str", "bert"),
           KV("tokenizer.ggml.pre", "str", "bert-bge" if norm.get("lowercase") else "default"),
           KV("tokenizer.ggml.tokens", "array", tokens, "str"),
           KV("tokenizer.ggml.token_type", "array", toktypes, "i32")]
    kv += [KV(f"tokenizer.ggml.{_ID_KEYS[role]}", "u32", tid) for role, tid in special.items()]
    # a [CLS] A [SEP] template: llama.cpp's SpecialVocab reads it as add_bos, add_eos, no add_sep
    kv += [KV("tokenizer.ggml.add_bos_token", "bool", True),
           KV("tokenizer.ggml.add_eos_token", "bool", True),
           KV("tokenizer.ggml.add_sep_token", "bool", False)]
    if "lowercase" in norm:
        kv.append(KV("tokenizer.ggml.normalizer.lowercase", "bool", bool(norm["lowercase"])))
    if norm.get("strip_accents") is not None:
        kv.append(KV("tokenizer.ggml.normalizer.strip_accents", "bool",
                     bool(norm["strip_accents"])))
    if max_len:
        kv.append(KV(MAX_SEQ_KEY, "u32", max_len))
    kv.append(KV("general.quantization_version", "u32", GGML_QNT_VERSION))

    order = sorted(tensors, key=lambda n: (n.startswith("blk."), _blk(n), n))
    types = {n: tensor_type(n, tensors[n].shape, qtype) for n in order}
    specs = [Tensor(n, types[n], tensors[n].shape, _encoded(tensors[n], types[n])) for n in order]
    write_gguf(out_path, kv, specs, progress)
    return {"path": str(out_path), "qtype": qtype, "size_bytes": out_path.stat().st_size,
            "n_tensors": len(order), "types": types}


def _encoded(a: np.ndarray, qtype: str):
    """The tensor's stored bytes, made only when the writer reaches it."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if qtype == "F32":
        yield a
    elif qtype == "F16":
        yield a.astype(np.float16)
    else:
        yield quant.quantize(qtype, a)


def _blk(name: str) -> int:
    return int(name.split(".")[1]) if name.startswith("blk.") else -1
