"""GGUF reader: valid files round-trip; every kind of broken file gets a clear GGUFError."""
from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest

from pocketlm.gguf.reader import GGUFError, open_gguf

T_U32, T_F32, T_STR, T_ARR = 4, 6, 8, 9


def _s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def build(kvs=None, tensors=None, *, magic=b"GGUF", version=3, n_tensors=None, n_kv=None,
          data_pad=0) -> bytes:
    """Hand-built GGUF bytes so tests can put any field out of range.

    kvs: list of raw (key, type, payload-bytes); tensors: list of (name, ne, type_id, offset, data).
    """
    kvs = kvs if kvs is not None else [("general.architecture", T_STR, _s("llama"))]
    tensors = tensors if tensors is not None else []
    out = bytearray(magic + struct.pack("<I", version))
    out += struct.pack("<QQ", len(tensors) if n_tensors is None else n_tensors,
                       len(kvs) if n_kv is None else n_kv)
    for key, t, payload in kvs:
        out += _s(key) + struct.pack("<I", t) + payload
    for name, ne, type_id, offset, _data in tensors:
        out += _s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
        out += struct.pack("<IQ", type_id, offset)
    out += b"\0" * (-len(out) % 32)
    blob = bytearray()
    for _name, _ne, _t, offset, data in tensors:
        if not data:
            continue
        if len(blob) < offset:
            blob += b"\0" * (offset - len(blob))
        blob[offset:offset + len(data)] = data
    out += blob + b"\0" * data_pad
    return bytes(out)


def f32_tensor(name, shape_ne, offset, rng):
    data = rng.standard_normal(int(np.prod(shape_ne))).astype(np.float32).tobytes()
    return (name, list(shape_ne), 0, offset, data)


@pytest.fixture
def write(tmp_path):
    def _write(data: bytes, name="m.gguf"):
        p = tmp_path / name
        p.write_bytes(data)
        return p
    return _write


def test_valid_file_roundtrip(write):
    rng = np.random.default_rng(0)
    arr = struct.pack("<IQ", T_U32, 3) + struct.pack("<3I", 7, 8, 9)
    strs = struct.pack("<IQ", T_STR, 2) + _s("a") + _s("β")
    kvs = [("general.architecture", T_STR, _s("llama")),
           ("llama.block_count", T_U32, struct.pack("<I", 2)),
           ("llama.rope.freq_base", T_F32, struct.pack("<f", 1e4)),
           ("x.arr", T_ARR, arr), ("x.strs", T_ARR, strs)]
    t0 = f32_tensor("a.weight", (8, 2), 0, rng)
    t1 = f32_tensor("b.weight", (4,), 64, rng)
    p = write(build(kvs, [t0, t1]))
    with open_gguf(p) as g:
        assert g.arch == "llama"
        assert g.metadata["llama.block_count"] == 2
        assert g.get("{arch}.rope.freq_base") == pytest.approx(1e4)
        assert g.metadata["x.arr"].tolist() == [7, 8, 9]
        assert g.metadata["x.strs"] == ["a", "β"]
        assert g.tensors["a.weight"].shape == (2, 8)
        a = g.raw("a.weight")
        assert np.array_equal(a.view(np.float32).reshape(2, 8),
                              np.frombuffer(t0[4], np.float32).reshape(2, 8))
        assert not a.flags.writeable and not a.flags.owndata  # a view of the mapped file
        assert np.array_equal(g.raw("b.weight").view(np.float32).ravel(),
                              np.frombuffer(t1[4], np.float32))


def test_reads_file_written_by_gguf_py(tmp_path):
    p = tmp_path / "w.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_block_count(3)
    w.add_token_list(["<s>", "hello", "wörld"])
    x = np.arange(64, dtype=np.float32).reshape(2, 32)
    q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("t.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open_gguf(p) as g:
        assert g.metadata["tokenizer.ggml.tokens"] == ["<s>", "hello", "wörld"]
        t = g.tensors["t.weight"]
        assert (t.qtype, t.shape, t.nbytes) == ("Q8_0", (2, 32), 68)
        assert np.array_equal(g.raw("t.weight"), q)


def test_real_model_index(smallthinker_tiny_path):
    with open_gguf(smallthinker_tiny_path) as g:
        assert g.arch == "smallthinker"
        assert g.tensors["blk.0.ffn_gate_exps.weight"].shape == (8, 128, 256)
        assert g.metadata["smallthinker.expert_count"] == 8
        assert len(g.metadata["tokenizer.ggml.tokens"]) == 49152


def _err(write, data: bytes, match: str):
    p = write(data)
    with pytest.raises(GGUFError, match=match) as e:
        open_gguf(p)
    msg = str(e.value)
    assert str(p) in msg and "\n" not in msg


def test_wrong_magic(write):
    _err(write, build(magic=b"GGML"), "not a GGUF file")


def test_empty_and_tiny_file(write):
    _err(write, b"", "not a GGUF file")
    _err(write, b"GGUF\3\0\0\0", "not a GGUF file")


@pytest.mark.parametrize("version", [0, 1, 4, 1 << 30])
def test_unsupported_version(write, version):
    _err(write, build(version=version), "unsupported GGUF version")


def test_big_endian(write):
    data = bytearray(build())
    data[4:8] = struct.pack(">I", 3)
    _err(write, bytes(data), "big-endian")


def test_truncated_header(write):
    full = build([("general.architecture", T_STR, _s("llama")),
                  ("k", T_U32, struct.pack("<I", 1))])
    for cut in (30, 40, len(full) - 40):
        _err(write, full[:cut] if cut > 24 else full[:cut] + b"\0" * 8, "truncated|outside")


def test_truncated_tensor_data(write):
    rng = np.random.default_rng(1)
    data = build(tensors=[f32_tensor("w", (32, 4), 0, rng)])
    _err(write, data[:-100], "lies outside the file")


def test_tensor_offset_outside_file(write):
    rng = np.random.default_rng(2)
    name, ne, t, _off, payload = f32_tensor("w", (8,), 0, rng)
    _err(write, build(tensors=[(name, ne, t, 1 << 40, b"")]), "lies outside the file")


def test_unknown_tensor_type(write):
    _err(write, build(tensors=[("w", [32], 99, 0, b"\0" * 128)]), "unknown type 99")


def test_shape_not_multiple_of_block(write):
    # Q4_0 blocks hold 32 values; a row of 33 cannot be laid out.
    _err(write, build(tensors=[("w", [33, 2], 2, 0, b"\0" * 64)]), "not a multiple")


def test_shapes_overlap(write):
    rng = np.random.default_rng(3)
    a = f32_tensor("a", (32,), 0, rng)
    b = f32_tensor("b", (32,), 32, rng)  # a takes 128 bytes, b starts inside it
    _err(write, build(tensors=[a, b]), "overlap")


def test_zero_and_too_many_dims(write):
    _err(write, build(tensors=[("w", [], 0, 0, b"")]), "dimensions")
    _err(write, build(tensors=[("w", [1, 1, 1, 1, 1], 0, 0, b"\0" * 4)]), "dimensions")
    _err(write, build(tensors=[("w", [0], 0, 0, b"")]), "invalid shape")


def test_absurd_array_length(write):
    payload = struct.pack("<IQ", T_U32, 3_000_000_000) + b"\0" * 16
    _err(write, build([("general.architecture", T_STR, _s("llama")), ("x", T_ARR, payload)]),
         "absurd metadata")


def test_absurd_string_array_length(write):
    payload = struct.pack("<IQ", T_STR, 1 << 50)
    _err(write, build([("x", T_ARR, payload)]), "absurd metadata")


def test_absurd_string_length(write):
    _err(write, build([("x", T_STR, struct.pack("<Q", 1 << 62))]), "absurd string|truncated")


def test_absurd_counts(write):
    _err(write, build(n_kv=1 << 40), "absurd metadata count")
    _err(write, build(n_tensors=1 << 40), "absurd tensor count")


def test_unknown_value_type(write):
    _err(write, build([("x", 77, b"\0" * 8)]), "unknown metadata value type")


def test_bad_alignment(write):
    _err(write, build([("general.alignment", T_U32, struct.pack("<I", 3))]), "alignment")


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        open_gguf(tmp_path / "nope.gguf")
