"""Tokenizer parity with llama.cpp.

Reference dumps for SmolLM2 and Gemma 3 (tests/data/reference/tokenize-*.json), and llama.cpp's own
vocab test vectors (models/ggml-vocab-*.gguf with .inp/.out, run as tests/test-tokenizer-0 does).
"""
from __future__ import annotations

import codecs
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest

from pocketlm.text.tokenizer import ATTR_USER_DEFINED, Tokenizer, UnsupportedTokenizer, pre_split

REFERENCES = {
    "smollm2": "tokenize-SmolLM2-135M-Instruct.Q4_1.json",
    "gemma3": "tokenize-gemma-3-270m-Q4_K_M.json",
    "qwen2": "tokenize-qwen2.5-coder-0.5b-instruct-q4_k_m.json",
}

# every ggml-vocab-*.gguf of llama.cpp (as vendored by llama-cpp-python 0.3.36) with test vectors
LLAMA_CPP_VOCABS = [
    "bert-bge", "command-r", "deepseek-coder", "deepseek-llm", "falcon", "gemma-4", "gpt-2",
    "llama-bpe", "llama-spm", "mpt", "phi-3", "qwen2", "qwen35", "refact", "starcoder",
]
# vocab files without test vectors: only checked to load and round-trip
LLAMA_CPP_VOCABS_NO_VECTORS = ["aquila", "baichuan", "gpt-neox", "nomic-bert-moe"]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@pytest.fixture(scope="module")
def tokenizers(smollm2_path, gemma3_path, qwen2_path):
    return {"smollm2": Tokenizer.load(smollm2_path), "gemma3": Tokenizer.load(gemma3_path),
            "qwen2": Tokenizer.load(qwen2_path)}


@pytest.fixture(scope="module")
def references(reference_dir, smollm2_path, gemma3_path, qwen2_path):
    refs = {k: json.loads((reference_dir / f).read_text(encoding="utf-8"))
            for k, f in REFERENCES.items()}
    for key, path in (("smollm2", smollm2_path), ("gemma3", gemma3_path),
                      ("qwen2", qwen2_path)):
        assert _sha256_file(path) == refs[key]["model_sha256"], f"{path} is not the reference model"
    return refs


# --- reference dumps ---------------------------------------------------------------------------

@pytest.mark.parametrize("model", list(REFERENCES))
def test_reference_header(model, tokenizers, references):
    tok, info = tokenizers[model], references[model]["tokenizer"]
    assert tok.model == info["model"]
    assert tok.pre == info["pre"]
    assert tok.n_vocab == info["n_vocab"]
    assert tok.add_bos == info["add_bos"]
    assert tok.add_eos == info["add_eos"]
    # the dump records the GGUF key; without it llama.cpp prefixes a space for SPM only
    want = info["add_space_prefix"] or str(info["model"] == "llama").lower()
    assert str(tok.add_space_prefix).lower() == want
    assert tok.bos_id == info["bos_id"]
    assert tok.eos_id == info["eos_id"]


@pytest.mark.parametrize("model", list(REFERENCES))
def test_reference_cases_ids(model, tokenizers, references):
    tok = tokenizers[model]
    cases = references[model]["cases"]
    assert len(cases) == references[model]["n_cases"]
    modes = {(c["add_special"], c["parse_special"]) for c in cases}
    assert {(True, False), (True, True), (False, False)} <= modes  # both modes of each flag
    failures = []
    for c in cases:
        ids = tok.encode(c["text"], add_special=c["add_special"], parse_special=c["parse_special"])
        if ids != c["ids"]:
            failures.append(f"{c['id']} {c['category']} {c['text'][:40]!r}: "
                            f"{ids[:12]} != {c['ids'][:12]}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("model", list(REFERENCES))
def test_reference_cases_detok(model, tokenizers, references):
    tok = tokenizers[model]
    failures = []
    for c in references[model]["cases"]:
        assert "detok_hex" not in c
        if tok.decode(c["ids"]) != c["detok"]:
            failures.append(f"{c['id']} detok {tok.decode(c['ids'])!r} != {c['detok']!r}")
        got = tok.decode(c["ids"], unparse_special=True)
        if got != c["detok_unparse_special"]:
            failures.append(f"{c['id']} unparse {got!r} != {c['detok_unparse_special']!r}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("model", list(REFERENCES))
def test_reference_papers(model, tokenizers, references, papers_path):
    tok = tokenizers[model]
    (entry,) = references[model]["files"]
    raw = papers_path.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == entry["text_sha256"]
    text = raw.decode("utf-8")
    t0 = time.perf_counter()
    ids = tok.encode(text, add_special=entry["add_special"], parse_special=entry["parse_special"])
    elapsed = time.perf_counter() - t0
    assert len(ids) == entry["n_tokens"]
    assert hashlib.sha256(np.asarray(ids, dtype="<i4").tobytes()).hexdigest() == entry["ids_sha256"]
    assert ids == entry["ids"]
    assert (tok.decode(ids) == text) == entry["detok_equals_text"]
    assert elapsed < 10.0, f"papers.txt took {elapsed:.2f}s to encode"


def test_documented_special_cases(tokenizers):
    smol, gemma = tokenizers["smollm2"], tokenizers["gemma3"]
    assert smol.encode("<|im_start|>", add_special=True, parse_special=True) == [1]
    assert gemma.encode("", add_special=True) == [2]
    assert gemma.encode("", add_special=False) == []
    three_bos = gemma.encode("<bos><bos>Hello", add_special=True, parse_special=True)
    assert three_bos[:3] == [2, 2, 2] and 2 not in three_bos[3:]
    end_s = gemma.token_to_id("</s>")
    assert gemma.encode("</s>", add_special=False, parse_special=True) == [end_s]
    assert gemma.encode("<unk>", add_special=False, parse_special=True) == [gemma.unk_id]
    # "<s>" is a user-defined token in Gemma: cut out even without parse_special, never BOS
    s_id = gemma.token_to_id("<s>")
    assert gemma.token_attr(s_id) & ATTR_USER_DEFINED and s_id != gemma.bos_id
    assert gemma.encode("<s>", add_special=False, parse_special=False) == [s_id]
    assert gemma.encode("</s>", add_special=False, parse_special=False) != [end_s]
    # without parse_special, control tokens are plain text
    assert 1 not in smol.encode("<|im_start|>", parse_special=False)


def test_eog_sets(tokenizers):
    smol, gemma = tokenizers["smollm2"], tokenizers["gemma3"]
    assert {smol.token_text(i) for i in smol.eog_ids} == {"<|endoftext|>", "<|im_end|>",
                                                          "<reponame>"}
    assert smol.eot_id == smol.token_to_id("<|im_end|>")
    assert {gemma.token_text(i) for i in gemma.eog_ids} == {"<eos>", "<end_of_turn>", "</s>"}
    assert gemma.eot_id == gemma.token_to_id("<end_of_turn>")
    assert all(gemma.is_eog(i) for i in gemma.stop_ids)


def test_token_bytes_stream_utf8(tokenizers):
    """Pieces are raw bytes: an emoji split into byte-fallback tokens streams back whole."""
    gemma = tokenizers["gemma3"]
    text = "naïve 🦙 ⟨x⟩ \U0001fae8 done"
    ids = gemma.encode(text)
    decoder = codecs.getincrementaldecoder("utf-8")()
    streamed = "".join(decoder.decode(gemma.token_bytes(i)) for i in ids)
    streamed += decoder.decode(b"", final=True)
    assert streamed == gemma.decode(ids) == text
    assert gemma.token_bytes(gemma.bos_id) == b""
    assert gemma.token_bytes(gemma.bos_id, special=True) == b"<bos>"
    assert gemma.token_to_piece(gemma.bos_id) == "<bos>"


def test_remove_special(tokenizers):
    gemma = tokenizers["gemma3"]
    ids = gemma.encode("Hello") + [gemma.eos_id]
    assert gemma.decode(ids, unparse_special=True) == "<bos>Hello<eos>"
    assert gemma.decode(ids, remove_special=True, unparse_special=True) == "Hello<eos>"


def test_pre_split_quirks():
    """llama.cpp's splitter, not HF's: digits in threes, case-folded contractions only in llama3."""
    assert pre_split("1234567 it'S", "llama3") == ["123", "456", "7", " it", "'S"]
    assert pre_split("it'S", "gpt-2") == ["it", "'", "S"]
    assert pre_split("x²³ 12", "starcoder") == ["x", "²", "³", " ", "1", "2"]
    assert pre_split("a  b", "gpt-2") == ["a", " ", " b"]
    assert pre_split("a\u00a0\u00a0b", "gpt-2") == ["a", "\u00a0", "\u00a0", "b"]
    assert pre_split("a\n\n b", "qwen2") == ["a", "\n\n", " b"]


# --- llama.cpp's vocab test suite -------------------------------------------------------------

def _read_vocab_tests(gguf: Path) -> list[tuple[str, list[int]]]:
    """Pairs from <vocab>.gguf.inp/.out, read the way test-tokenizer-0.cpp reads them."""
    raw = Path(str(gguf) + ".inp").read_bytes().decode("utf-8", "surrogateescape")
    sep = "\n__ggml_vocab_test__\n"
    inputs, pos = [], 0
    while pos < len(raw):
        nxt = raw.find(sep, pos)
        if nxt < 0:
            inputs.append(raw[pos:])
            break
        inputs.append(raw[pos:nxt])
        pos = nxt + len(sep)
    lines = Path(str(gguf) + ".out").read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # getline() yields no line after the final newline
    outputs = [[int(t) for t in line.strip().split(" ")] if line.strip() else [] for line in lines]
    assert len(inputs) == len(outputs), "input and output files have different number of tests"
    return list(zip(inputs, outputs))


def _load_or_skip(path: Path) -> Tokenizer:
    try:
        return Tokenizer.load(path)
    except UnsupportedTokenizer as e:
        pytest.skip(f"unsupported: {e}")


def test_llama_cpp_vocab_list_is_complete(llama_cpp_src):
    found = {p.name[len("ggml-vocab-"):-len(".gguf")]
             for p in (llama_cpp_src / "models").glob("ggml-vocab-*.gguf")}
    with_vectors = {n for n in found
                    if (llama_cpp_src / "models" / f"ggml-vocab-{n}.gguf.inp").exists()}
    assert with_vectors == set(LLAMA_CPP_VOCABS)
    assert found - with_vectors == set(LLAMA_CPP_VOCABS_NO_VECTORS)


@pytest.mark.parametrize("name", LLAMA_CPP_VOCABS)
def test_llama_cpp_vocab(name, llama_cpp_src):
    path = llama_cpp_src / "models" / f"ggml-vocab-{name}.gguf"
    tests = _read_vocab_tests(path)
    tok = _load_or_skip(path)
    failures = []
    for text, expected in tests:
        got = tok.encode(text, add_special=False, parse_special=False)
        if got != expected:
            failures.append(f"{text[:50]!r}: got {got[:16]} expected {expected[:16]}")
    assert not failures, f"{len(failures)}/{len(tests)} failed:\n" + "\n".join(failures[:10])


@pytest.mark.parametrize("name", LLAMA_CPP_VOCABS_NO_VECTORS)
def test_llama_cpp_vocab_loads(name, llama_cpp_src):
    tok = _load_or_skip(llama_cpp_src / "models" / f"ggml-vocab-{name}.gguf")
    text = "Hello world, 123 ünïcode\n\ttabs  and 🦙."
    ids = tok.encode(text, add_special=False)
    assert ids and all(0 <= i < tok.n_vocab for i in ids)
    assert tok.decode(ids) == text


def test_clean_spaces_on_decode(llama_cpp_src):
    """GPT-2 style vocabs tidy " ," / " ' " / " 's" on decode, exactly as llama_detokenize does."""
    tok = Tokenizer.load(llama_cpp_src / "models" / "ggml-vocab-gpt-2.gguf")
    assert tok.clean_spaces
    ids = tok.encode("a , b ' c 's d 't e 're f 'll !", add_special=False)
    assert tok.decode(ids) == "a, b'c's d 't e're f 'll!"


def test_wordpiece_adds_cls_and_sep(llama_cpp_src):
    """bert vocabs are WordPiece: [CLS] ... [SEP] around the pieces, text lowercased."""
    tok = Tokenizer.load(llama_cpp_src / "models" / "ggml-vocab-bert-bge.gguf")
    assert tok.model == "bert"
    assert tok.encode("Hello World!") == [101, 7592, 2088, 999, 102]
    assert tok.encode("Hello World!", add_special=False) == [7592, 2088, 999]
