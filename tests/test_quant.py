"""quant: bit-exact dequantization and byte-exact reference quantization against gguf-py.

gguf-py's ``gguf.quants`` is the oracle: its test suite checks it against the C library.
Q8_K, which gguf-py does not implement, is checked against a scalar transcription of ggml's C.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gq

from pocketlm import quant
from pocketlm.gguf.reader import open_gguf

ORACLE_DEQUANT = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                  "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "MXFP4"]
ORACLE_QUANT = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4"]

# byte offsets of the fp16 scales in each block (everything else may be random bits)
F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
              "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def oracle_dequant(qtype: str, raw: np.ndarray, shape) -> np.ndarray:
    rows = raw.reshape(int(np.prod(shape[:-1])), -1)
    return gq.dequantize(rows, GGMLQuantizationType[qtype]).astype(np.float32).reshape(shape)


def oracle_quant(qtype: str, x: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # fp16 overflow on huge inputs
        return np.asarray(gq.quantize(x, GGMLQuantizationType[qtype])).view(np.uint8).reshape(
            *x.shape[:-1], -1)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def random_blocks(qtype: str, n_blocks: int, rng) -> np.ndarray:
    """Random raw blocks whose fp16 scales are finite: normal, tiny, subnormal and negative."""
    ts = quant.type_size(qtype)
    raw = rng.integers(0, 256, size=(n_blocks, ts), dtype=np.uint8)
    if qtype == "F32":
        return rng.standard_normal(n_blocks).astype(np.float32).view(np.uint8).reshape(n_blocks, 4)
    if qtype == "F16":
        return rng.standard_normal(n_blocks).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    if qtype in ("BF16", "MXFP4"):
        return raw   # every pattern (bf16 NaN and inf, every E8M0 scale) decodes exactly
    scales = rng.standard_normal((n_blocks, 1)) * 10.0 ** rng.integers(-8, 3, (n_blocks, 1))
    for at in F16_FIELDS[qtype]:
        raw[:, at:at + 2] = scales.astype(np.float16).view(np.uint8)
        scales = rng.standard_normal((n_blocks, 1))
    return raw


@pytest.mark.parametrize("qtype", ORACLE_DEQUANT)
def test_dequantize_random_blocks_bit_exact(qtype):
    rng = np.random.default_rng(1)
    bs = quant.block_size(qtype)
    shape = (3, 64, 8 * max(bs, 32))
    n_blocks = int(np.prod(shape)) // bs
    raw = random_blocks(qtype, n_blocks, rng)
    got = quant.dequantize(qtype, raw, shape)
    assert got.dtype == np.float32 and got.shape == shape
    assert same_bits(got, oracle_dequant(qtype, raw, shape))
    # bytes input gives the same result as an array
    assert same_bits(quant.dequantize(qtype, raw.tobytes(), shape), got)


def _edge_cases(bs: int, rng) -> np.ndarray:
    """Rows of blocks that exercise ties, zeros and extreme magnitudes."""
    blocks = []
    blocks.append(np.zeros(bs))                                  # all zero
    blocks.append(np.full(bs, 3.0))                              # constant: d = 0 for Q4_1
    blocks.append(np.full(bs, -2.5))
    b = rng.standard_normal(bs); b[3] = -7.0; b[9] = 7.0         # |max| tie: first (negative) wins
    blocks.append(b)
    b = rng.standard_normal(bs); b[3] = 7.0; b[9] = -7.0
    blocks.append(b)
    b = rng.standard_normal(bs); b[5] = -50.0                    # negative max
    blocks.append(b)
    b = np.arange(bs) - bs / 2 + 0.5                             # x/d lands on .5 (roundf ties)
    blocks.append(b)
    b = (np.arange(bs) % 17 - 8 + 0.5) * 0.5; b[0] = 127 / 2     # Q8_0: d = 0.5, x/d = k + 0.5
    blocks.append(b)
    b = -b                                                       # the same ties, negative
    blocks.append(b)
    blocks.append(rng.standard_normal(bs) * 1e30)                # fp16 scale overflows to inf
    blocks.append(rng.standard_normal(bs) * 1e-30)               # scale underflows to 0
    blocks.append(rng.standard_normal(bs) * 6e-6)                # fp16 subnormal scales
    blocks.append(np.full(bs, 65504.0))
    b = np.zeros(bs); b[bs - 1] = 1e-3                           # a single non-zero at the end
    blocks.append(b)
    blocks.append(-np.abs(rng.standard_normal(bs)))              # all negative
    blocks.append(rng.integers(-8, 8, bs).astype(np.float64))    # exact grid values
    return np.stack(blocks).astype(np.float32)


@pytest.mark.parametrize("qtype", ORACLE_QUANT)
def test_quantize_byte_exact(qtype):
    rng = np.random.default_rng(2)
    bs = max(quant.block_size(qtype), 32)
    x = (rng.standard_normal((200, 8 * bs)) * rng.uniform(1e-3, 20, (200, 1))).astype(np.float32)
    x[:, :bs] = rng.uniform(-1, 1, (200, bs)) * 2.0 ** rng.integers(-20, 20, (200, 1))
    got = quant.quantize(qtype, x)
    assert got.dtype == np.uint8 and got.shape == (200, quant.row_bytes(qtype, 8 * bs))
    assert np.array_equal(got, oracle_quant(qtype, x))

    edges = _edge_cases(bs, rng)
    with np.errstate(over="ignore"):
        got = quant.quantize(qtype, edges)
    assert np.array_equal(got, oracle_quant(qtype, edges))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_quantize_3d_and_round_trip(qtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 96)).astype(np.float32)
    q = quant.quantize(qtype, x)
    assert q.shape == (2, 5, quant.row_bytes(qtype, 96))
    y = quant.dequantize(qtype, q, x.shape)
    # error bounded by one quantization step of the block's scale
    levels = {"Q4_0": 8, "Q4_1": 15, "Q5_0": 16, "Q5_1": 31, "Q8_0": 127}[qtype]
    amax = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True)
    err = np.abs((y - x).reshape(-1, 32))
    assert np.all(err <= 2.5 * amax / levels + 1e-6)
    # quantize is a fixed point on its own output
    assert np.array_equal(quant.quantize(qtype, y), q)


def test_q4_0_leading_negative_zero_follows_c():
    # ggml starts from max = +0.0, so an all-zero block gets d = 0/-8 = -0.0 whatever the sign of
    # its zeros; gguf-py's argmax would pick up the first element's -0.0 and store +0.0 instead.
    x = np.zeros((1, 32), np.float32)
    x[0, 0] = -0.0
    for qtype, size in (("Q4_0", 18), ("Q5_0", 22)):
        q = quant.quantize(qtype, x)[0]
        assert q[:2].tolist() == [0x00, 0x80]
        mid = 0x88 if qtype == "Q4_0" else 0x00
        assert q[size - 16:].tolist() == [mid] * 16


# -- Q8_K: scalar transcription of ggml's C code ---------------------------------------------

def _q8_k_ref(x: np.ndarray) -> bytes:
    out = bytearray()
    for blk in x.reshape(-1, 256):
        amax, mx = np.float32(0), np.float32(0)
        for v in blk:
            if abs(v) > amax:
                amax, mx = abs(v), v
        if amax == 0:
            out += bytes(292)
            continue
        iscale = np.float32(-127) / mx
        qs = []
        for v in blk:
            val = np.float32(iscale * v) + np.float32(12582912.0)   # nearest_int()
            i = int(np.array(val, np.float32).view(np.int32))
            qs.append(min(127, (i & 0x007FFFFF) - 0x00400000))
        out += np.array([np.float32(1) / iscale], "<f4").tobytes()
        out += np.array(qs, np.int8).tobytes()
        out += np.array([sum(qs[j:j + 16]) for j in range(0, 256, 16)], "<i2").tobytes()
    return bytes(out)


def test_q8_k_against_scalar_c():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 256)).astype(np.float32) * np.float32(3)
    x[1] = 0
    x[2, 7] = -40
    x[3] = (np.arange(256) - 128) / 127 * 2.0    # halves: round half to even
    q = quant.quantize("Q8_K", x)
    assert q.tobytes() == _q8_k_ref(x)
    y = quant.dequantize("Q8_K", q, x.shape)
    d = q[:, 0:4].copy().view(np.float32)
    assert same_bits(y, d * q[:, 4:260].copy().view(np.int8).astype(np.float32))


# -- real tensors ------------------------------------------------------------------------------

def test_dequantize_smollm2_tensors(smollm2_path):
    with open_gguf(smollm2_path) as g:
        names = ["token_embd.weight", "output_norm.weight",
                 *[n for n in g.tensors if n.startswith("blk.0.")]]
        types = set()
        for name in names:
            t = g.tensors[name]
            types.add(t.qtype)
            got = quant.dequantize(t.qtype, g.raw(name), t.shape)
            assert same_bits(got, oracle_dequant(t.qtype, g.raw(name), t.shape)), name
        assert types == {"Q8_0", "Q4_1", "F32"}


def test_dequantize_gemma3_kquant_tensors(gemma3_path):
    with open_gguf(gemma3_path) as g:
        seen = {}
        for name, t in g.tensors.items():
            if t.qtype not in seen and t.qtype != "F32" and t.n_elements < 4_000_000:
                seen[t.qtype] = name
        assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0"} <= set(seen)
        for qtype, name in seen.items():
            t = g.tensors[name]
            got = quant.dequantize(t.qtype, g.raw(name), t.shape)
            assert same_bits(got, oracle_dequant(t.qtype, g.raw(name), t.shape)), name


# -- API ---------------------------------------------------------------------------------------

def test_sizes_and_registry():
    assert set(quant.QTYPES) >= {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                                 "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"}
    assert set(quant.QUANTIZE_QTYPES) >= {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                                          "Q8_0"}
    for name in quant.QTYPES:
        bs, ts = gq.GGML_QUANT_SIZES[GGMLQuantizationType[name]]
        assert (quant.block_size(name), quant.type_size(name)) == (bs, ts)
        assert quant.block_type(name).name == name
    assert quant.row_bytes("Q4_0", 576) == 18 * 18
    assert quant.row_bytes("Q6_K", 512) == 2 * 210
    with pytest.raises(ValueError):
        quant.row_bytes("Q4_K", 576)
    with pytest.raises(ValueError):
        quant.block_size("Q9_9")
    with pytest.raises(ValueError):
        quant.quantize("Q6_K", np.zeros((1, 256), np.float32))
    with pytest.raises(ValueError):
        quant.dequantize("Q4_0", np.zeros(17, np.uint8), (32,))
    with pytest.raises(ValueError):
        quant.quantize("Q4_0", np.zeros((2, 48), np.float32))
