"""GGUF writer: every metadata value type and a few tensor types round-trip through the reader
(and gguf's own reader), raw entries copy byte for byte, bad input gets a one-line ValueError."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGUFValueType as V

from pocketlm import quant
from pocketlm.gguf import open_gguf
from pocketlm.gguf.writer import KV, TYPE_NAMES, Tensor, copy_kv, write_gguf

KVS = [
    KV("general.architecture", V.STRING, "llama"),
    KV("t.u8", V.UINT8, 255), KV("t.i8", V.INT8, -128),
    KV("t.u16", V.UINT16, 65535), KV("t.i16", V.INT16, -32768),
    KV("t.u32", "u32", 4_000_000_000), KV("t.i32", "i32", -2_000_000_000),
    KV("t.u64", V.UINT64, 2**64 - 1), KV("t.i64", V.INT64, -2**63),
    KV("t.f32", V.FLOAT32, 0.1), KV("t.f64", V.FLOAT64, 0.1),
    KV("t.true", V.BOOL, True), KV("t.false", "bool", False),
    KV("t.str", V.STRING, "héllo ▁"), KV("t.empty", V.STRING, ""),
    KV("t.arr_i32", V.ARRAY, [1, -2, 3], V.INT32),
    KV("t.arr_u8", "array", np.arange(5, dtype=np.uint8), "u8"),
    KV("t.arr_f32", V.ARRAY, [0.5, -1.25], V.FLOAT32),
    KV("t.arr_u64", V.ARRAY, [2**63], V.UINT64),
    KV("t.arr_bool", V.ARRAY, [True, False], V.BOOL),
    KV("t.arr_str", V.ARRAY, ["a", "", "ü"], V.STRING),
    KV("t.arr_none", V.ARRAY, [], V.INT32),
]


def _tensors(rng):
    q = rng.standard_normal((4, 64), dtype=np.float32)
    return {"a.f32": ("F32", (3, 5), rng.standard_normal((3, 5), dtype=np.float32)),
            "b.f16": ("F16", (7,), rng.standard_normal(7).astype(np.float16)),
            "c.q4_0": ("Q4_0", (4, 64), quant.quantize("Q4_0", q)),
            "d.i8": ("I8", (2, 3, 3), rng.integers(-128, 128, (2, 3, 3), dtype=np.int8)),
            "e.q8_0": ("Q8_0", (2, 32), quant.quantize("Q8_0", q[:2, :32]))}


@pytest.mark.parametrize("align", [None, 64])
def test_round_trip(tmp_path, align):
    kvs = KVS + ([KV("general.alignment", V.UINT32, align)] if align else [])
    tensors = _tensors(np.random.default_rng(0))
    out = tmp_path / "m.gguf"
    # one tensor streamed in two chunks, the others as one buffer
    specs = [Tensor(n, t, s, d if n != "c.q4_0" else iter((d[:1], d[1:])))
             for n, (t, s, d) in tensors.items()]
    assert write_gguf(out, kvs, specs) == out
    assert not (tmp_path / "m.gguf.part").exists()
    align = align or 32
    with open_gguf(out) as g:
        assert g.version == 3 and g.alignment == align
        assert list(g.metadata) == [kv.key for kv in kvs]
        m = g.metadata
        for kv in kvs:
            if kv.key in ("t.f32", "t.arr_f32"):
                assert np.allclose(m[kv.key], kv.value)
            elif isinstance(m[kv.key], np.ndarray):
                assert m[kv.key].tolist() == list(kv.value), kv.key
            else:
                assert m[kv.key] == kv.value, kv.key
        assert m["t.f32"] == np.float32(0.1) and m["t.f64"] == 0.1
        assert g.data_offset % align == 0
        assert list(g.tensors) == list(tensors)
        for name, (qtype, shape, data) in tensors.items():
            t = g.tensors[name]
            assert (t.qtype, t.shape) == (qtype, shape)
            assert (t.offset - g.data_offset) % align == 0
            assert g.raw(name).tobytes() == data.tobytes()
    # gguf's own reader agrees on the value types
    r = gguf.GGUFReader(str(out))
    for kv in kvs:
        types = [TYPE_NAMES.get(kv.type, kv.type)]
        if kv.item_type is not None and len(kv.value):   # (gguf omits it for empty arrays)
            types.append(TYPE_NAMES.get(kv.item_type, kv.item_type))
        assert r.fields[kv.key].types[:len(types)] == types, kv.key
    assert out.stat().st_size % align == 0   # every tensor's data is padded


def test_copied_entries_keep_their_bytes(tmp_path):
    src = tmp_path / "src.gguf"
    write_gguf(src, KVS, [])
    dst = tmp_path / "dst.gguf"
    with open_gguf(src) as g:
        copied = copy_kv(g, lambda k: k.startswith("t."))
        assert [kv.key for kv in copied] == [kv.key for kv in KVS[1:]]
        assert copied[0].value == 255
        write_gguf(dst, [KVS[0], *copied], [])
    assert dst.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("kvs, tensors, message", [
    ([KV("k", "u33", 1)], [], "k: unknown GGUF value type 'u33'"),
    ([KV("k", V.UINT8, 256)], [], "k: 256 is not a UINT8 value"),
    ([KV("k", V.STRING, 3)], [], "k: 3 is not a STRING value"),
    ([KV("k", V.ARRAY, [1, 2])], [], "k: an array needs an item type"),
    ([KV("k", V.ARRAY, [1.5], V.INT32)], [], "k: not a one-dimensional array of INT32 values"),
    ([KV("k", V.ARRAY, [[1]], V.ARRAY)], [], "k: arrays of ARRAY are not supported"),
    ([KV("general.alignment", V.UINT32, 48)], [], "general.alignment 48 is not a power of two"),
    ([], [Tensor("w", "Q9_9", (2, 32), b"")], "tensor w: unknown ggml type 'Q9_9'"),
    ([], [Tensor("w", "Q4_0", (2, 33), b"")], "tensor w: row length 33 is not a multiple"),
    ([], [Tensor("w", "F32", (), b"")], "tensor w: invalid shape ()"),
    ([], [Tensor("w", "F32", (2, 3), bytes(20))],
     "tensor w: 20 bytes of data, but F32 (2, 3) takes 24"),
    ([], [Tensor("w", "F32", (2, 3), (bytes(16), bytes(16)))],
     "tensor w: more than 24 bytes of data, but F32 (2, 3) takes 24"),
    ([], [Tensor("w", "F32", (1,), bytes(4)), Tensor("w", "F32", (1,), bytes(4))],
     "duplicate tensor name w"),
])
def test_bad_input(tmp_path, kvs, tensors, message):
    out = tmp_path / "bad.gguf"
    with pytest.raises(ValueError) as e:
        write_gguf(out, kvs, tensors)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert not out.exists() and not (tmp_path / "bad.gguf.part").exists()


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        write_gguf(tmp_path / "no" / "m.gguf", [], [])
