"""Packed (lanes = blocks) matvec for Q4_0/Q4_1/Q8_0 against the raw-block kernels."""
from __future__ import annotations

import numpy as np
import pytest

import runtime.kernels as K
from runtime.gguf import GGUFFile
from runtime.kernels import _packed as P
from test_kernels import emulate, random_weights

RNG = np.random.default_rng(1)


def check(qtype, data, cols, x):
    pw = P.pack(qtype, data, cols)
    got = P.matvec_packed(pw, x)
    raw = K.matvec_raw(qtype, data, cols, x)
    ref, scale = emulate(qtype, data, cols, x)
    # same block sums and block scaling as the raw kernel; only the order of block terms differs
    assert np.all(np.abs(got - raw) <= 1e-5 * scale + 1e-30), qtype
    assert np.all(np.abs(got - ref) <= 2e-5 * scale + 1e-30), qtype
    return pw, got


@pytest.mark.parametrize("qtype", P.PACKED_TYPES)
@pytest.mark.parametrize("rows, cols", [(37, 320), (8, 256), (3, 32), (19, 800)])
def test_packed_matvec_random(qtype, rows, cols):
    data = random_weights(qtype, rows, cols)   # cols/32 blocks: 10, 8, 1, 25 (padding groups)
    x = RNG.standard_normal(cols).astype(np.float32)
    x[:40] = 0                                  # zero activation blocks
    pw, got = check(qtype, data, cols, x)
    out = np.empty(rows, np.float32)
    assert P.matvec_packed(pw, x, out) is out
    np.testing.assert_array_equal(out, got)
    assert np.all(P.matvec_packed(pw, np.zeros(cols, np.float32)) == 0)
    # a few activation rows at once equal separate matvecs
    xs = RNG.standard_normal((3, cols)).astype(np.float32)
    many = P.matvec_packed(pw, xs)
    for t in range(3):
        np.testing.assert_array_equal(many[t], P.matvec_packed(pw, xs[t]))


def test_pack_errors():
    data = random_weights("Q4_0", 2, 64)
    with pytest.raises(ValueError):
        P.pack("Q4_0", data, 96)
    with pytest.raises(NotImplementedError):
        P.pack("Q4_K", data, 64)
    pw = P.pack("Q4_0", data, 64)
    assert pw.qs.shape == (2, 1, 16, 8) and pw.d.shape == (2, 1, 8) and pw.m is None
    with pytest.raises(ValueError):
        P.matvec_packed(pw, np.zeros(32, np.float32))


def test_packed_real_tensors(smollm2_path):
    f = GGUFFile(smollm2_path)
    seen = set()
    for name in ("blk.0.ffn_gate.weight", "blk.0.ffn_down.weight", "blk.0.attn_q.weight"):
        w = f.tensor(name)
        if w.qtype not in P.PACKED_TYPES:
            continue
        seen.add(w.qtype)
        x = RNG.standard_normal(w.cols).astype(np.float32)
        check(w.qtype, w.data[3:70], w.cols, x)
        pw = K.prepare(w)
        np.testing.assert_array_equal(K.matvec(pw, x)[3:70], P.matvec_packed(P.pack(w.qtype, w.data[3:70], w.cols), x))
        np.testing.assert_array_equal(K.matmul(pw, x[None], method="quant")[0], K.matvec_raw(w.qtype, w.data, w.cols, x))
    assert seen
