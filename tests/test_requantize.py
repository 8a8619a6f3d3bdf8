"""requantize: SmolLM2 Q4_1 -> Q4_0 / Q8_0 must reproduce llama.cpp's files, tensor by tensor."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gq

from pocketlm import quant
from pocketlm.quant.requantize import FTYPES, plan_tensors, requantize
from pocketlm.gguf.reader import TensorInfo, open_gguf


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="module")
def requant_ref(reference_dir):
    return json.loads((reference_dir / "requant-tensor-sha256.json").read_text())


@pytest.fixture(scope="module")
def inventory(reference_dir):
    return {m["file"]: m for m in json.loads((reference_dir / "model_inventory.json").read_text())}


@pytest.fixture(scope="module", params=["Q4_0", "Q8_0"])
def requantized(request, smollm2_path, requant_ref, tmp_path_factory):
    assert sha256_file(smollm2_path) == requant_ref["source_sha256"]
    qtype = request.param
    ref = next(f for f in requant_ref["files"] if f["target_ftype"] == qtype)
    calls = []
    dst = tmp_path_factory.mktemp("requant") / ref["file"]
    summary = requantize(smollm2_path, dst, qtype, progress=lambda d, t: calls.append((d, t)))
    return qtype, dst, summary, calls, ref


def test_every_tensor_matches_llama_cpp(requantized):
    qtype, dst, summary, _calls, ref = requantized
    with open_gguf(dst) as g:
        names = list(g.tensors)
        assert len(names) == ref["n_tensors"] == len(ref["tensors"])
        for t in ref["tensors"]:
            info = g.tensors[t["name"]]
            assert names.index(t["name"]) == t["index"], t["name"]
            assert info.qtype == t["type"], t["name"]
            assert list(reversed(info.shape)) == t["shape"], t["name"]
            assert info.nbytes == t["n_bytes"], t["name"]
            assert hashlib.sha256(g.raw(t["name"])).hexdigest() == t["sha256"], t["name"]
    assert summary["n_requantized"] == ref["n_requantized"]
    assert summary["n_copied"] == ref["n_unchanged"]
    assert summary["types"]["token_embd.weight"] == "Q8_0"


def test_whole_file_matches_llama_cpp(requantized, inventory):
    # same metadata encoding, tensor infos, alignment and padding: the file is byte-identical
    qtype, dst, summary, _calls, ref = requantized
    inv = inventory[ref["file"]]
    assert dst.stat().st_size == inv["size_bytes"] == summary["size_bytes"]
    assert sha256_file(dst) == ref["sha256"] == inv["sha256"]


def test_metadata_and_progress(requantized, inventory):
    qtype, dst, _summary, calls, ref = requantized
    expected = inventory[ref["file"]]["metadata"]
    with open_gguf(dst) as g:
        assert list(g.metadata) == list(expected)
        assert g.metadata["general.file_type"] == FTYPES[qtype]
        for key, want in expected.items():
            got = g.metadata[key]
            if isinstance(want, dict):       # long arrays: length and first entries
                assert len(got) == want["array_len"]
                assert list(got[:len(want["head"])]) == want["head"]
            elif isinstance(want, str) and re.fullmatch(r"(?s).*\.\.\.<\d+ chars>", want):
                head, total = re.fullmatch(r"(?s)(.*)\.\.\.<(\d+) chars>", want).groups()
                assert got.startswith(head) and len(got) == int(total), key   # cut in the inventory
            elif isinstance(want, float):
                assert got == pytest.approx(want, rel=1e-7)
            else:
                assert got == want, key
    assert calls == [(i, 272) for i in range(1, 273)]


# -- type rules on synthetic models ------------------------------------------------------------

@dataclass
class FakeGGUF:
    arch: str
    metadata: dict
    tensors: dict


def fake(tensors: dict[str, tuple[str, tuple[int, ...]]], arch="llama", **meta) -> FakeGGUF:
    infos = {n: TensorInfo(n, q, s, 0, 0) for n, (q, s) in tensors.items()}
    return FakeGGUF(arch, {"general.architecture": arch, **meta}, infos)


def types_of(src, qtype) -> dict[str, str]:
    return {p.name: p.dst_type for p in plan_tensors(src, qtype)}


def test_output_and_tied_embedding_rules():
    untied = fake({"token_embd.weight": ("F16", (1000, 512)), "output.weight": ("F16", (1000, 512)),
                   "output_norm.weight": ("F32", (512,))})
    assert types_of(untied, "Q4_0") == {"output.weight": "Q6_K", "output_norm.weight": "F32",
                                        "token_embd.weight": "Q4_0"}
    assert types_of(untied, "Q8_0")["output.weight"] == "Q8_0"
    # tied: token_embd is the output matrix; 576 % 256 != 0, so Q6_K falls back to Q8_0
    tied = fake({"token_embd.weight": ("Q4_1", (1000, 576))})
    assert types_of(tied, "Q4_0") == {"token_embd.weight": "Q8_0"}
    assert types_of(tied, "Q5_1") == {"token_embd.weight": "Q8_0"}
    tied256 = fake({"token_embd.weight": ("F16", (1000, 768))})
    assert types_of(tied256, "Q4_1") == {"token_embd.weight": "Q6_K"}
    # a row that is not even a multiple of 32 cannot be Q8_0/Q4_0: F16
    odd = fake({"output.weight": ("F32", (10, 40)), "blk.0.attn_q.weight": ("F32", (40, 40))})
    assert types_of(odd, "Q4_0") == {"output.weight": "F16",
                                     "blk.0.attn_q.weight": "F16"}
    assert types_of(untied, "F16")["output.weight"] == "F16"


def test_kept_tensors_expert_rule_and_order():
    src = fake({
        "blk.10.attn_k.weight": ("F16", (64, 256)), "blk.2.attn_v.weight": ("F16", (64, 256)),
        "blk.2.attn_norm.weight": ("F32", (256,)), "blk.2.ffn_gate_inp.weight": ("F32", (8, 256)),
        "blk.2.ffn_up_exps.weight": ("F16", (8, 128, 256)), "blk.2.attn_q.weight": ("F16", (256, 256)),
        "rope_freqs.weight": ("F32", (32,)), "output.weight": ("F16", (100, 256)),
        "token_embd.weight": ("F16", (100, 256)), "blk.2.bias_col": ("F16", (1, 256)),
    }, **{"llama.expert_count": 8})
    plans = plan_tensors(src, "Q4_0")
    assert [p.name for p in plans] == [
        "output.weight", "rope_freqs.weight", "token_embd.weight",
        "blk.2.attn_norm.weight", "blk.2.attn_q.weight", "blk.2.attn_v.weight", "blk.2.bias_col",
        "blk.2.ffn_gate_inp.weight", "blk.2.ffn_up_exps.weight", "blk.10.attn_k.weight"]
    t = {p.name: p.dst_type for p in plans}
    assert t["blk.2.attn_v.weight"] == t["blk.10.attn_k.weight"] == "Q8_0"   # 8 experts
    assert t["blk.2.attn_q.weight"] == t["blk.2.ffn_up_exps.weight"] == "Q4_0"
    assert t["blk.2.ffn_gate_inp.weight"] == "F32" and t["blk.2.attn_norm.weight"] == "F32"
    assert t["blk.2.bias_col"] == "F16"            # not a weight, and only 1-D in ggml's eyes
    assert t["output.weight"] == "Q6_K"
    with pytest.raises(ValueError):
        plan_tensors(src, "Q4_K")


def _write_gguf(path, tensors: dict[str, tuple[str, np.ndarray]]):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_file_type(1)
    for name, (qtype, raw) in tensors.items():
        w.add_tensor(name, raw, raw_dtype=GGMLQuantizationType[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_float_sources_small_model(tmp_path):
    rng = np.random.default_rng(5)
    x_emb = rng.standard_normal((16, 64)).astype(np.float32)
    x_q = rng.standard_normal((32, 64)).astype(np.float32)
    src = tmp_path / "tiny-f16.gguf"
    _write_gguf(src, {
        "token_embd.weight": ("F16", x_emb.astype(np.float16).view(np.uint8)),
        "blk.0.attn_q.weight": ("BF16", quant.quantize("BF16", x_q)),
        "blk.0.attn_norm.weight": ("F32", np.ones(64, np.float32).view(np.uint8)),
    })
    summary = requantize(src, tmp_path / "tiny-q5_1.gguf", "Q5_1")
    assert summary["types"] == {"token_embd.weight": "Q8_0", "blk.0.attn_norm.weight": "F32",
                                "blk.0.attn_q.weight": "Q5_1"}
    with open_gguf(tmp_path / "tiny-q5_1.gguf") as g:
        assert g.metadata["general.file_type"] == FTYPES["Q5_1"]
        assert list(g.metadata)[-2:] == ["general.quantization_version", "general.file_type"]
        want_emb = gq.quantize(x_emb.astype(np.float16).astype(np.float32), GGMLQuantizationType.Q8_0)
        assert np.array_equal(g.raw("token_embd.weight"), want_emb)
        x_bf = quant.dequantize("BF16", quant.quantize("BF16", x_q), x_q.shape)
        assert np.array_equal(g.raw("blk.0.attn_q.weight"),
                              gq.quantize(x_bf, GGMLQuantizationType.Q5_1))
    # an untied output of width 256 needs Q6_K, which is not implemented: refused up front
    _write_gguf(tmp_path / "wide.gguf", {
        "output.weight": ("F32", np.zeros((4, 256), np.float32).view(np.uint8))})
    with pytest.raises(ValueError, match="Q6_K"):
        requantize(tmp_path / "wide.gguf", tmp_path / "wide-q4_0.gguf", "Q4_0")
    assert not (tmp_path / "wide-q4_0.gguf").exists()
