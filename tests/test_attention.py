"""Attention kernel and KV cache vs a plain numpy reference (causal, GQA, sliding window, ring)."""
from __future__ import annotations

import numpy as np
import pytest

from pocketlm.kernels import attention as A
from pocketlm.kernels.attention import attend
from pocketlm.nn.kvcache import KVCache, LayerCache


def ref_attention(q, k, v, q_pos, k_pos, scale, window=0, f16=False, sinks=None):
    # q (n, H, D); k, v (m, KVH, D); positions give the mask; f16: weights rounded to float16
    # after the softmax (llama.cpp's attention without flash attention); sinks (H,): a
    # valueless logit per head in each softmax
    n, H, D = q.shape
    group = H // k.shape[1]
    out = np.zeros((n, H, D))
    for t in range(n):
        for h in range(H):
            kh = h // group
            ok = (k_pos <= q_pos[t]) & (k_pos >= 0)
            if window:
                ok &= q_pos[t] - k_pos < window
            s = (k[:, kh].astype(np.float64) @ q[t, h].astype(np.float64)) * scale
            s = np.where(ok, s, -np.inf)
            sink = -np.inf if sinks is None else float(sinks[h])
            top = max(s.max(), sink)
            w = np.exp(s - top)
            w /= w.sum() + np.exp(sink - top)
            if f16:
                w = w.astype(np.float32).astype(np.float16).astype(np.float64)
            out[t, h] = w @ v[:, kh].astype(np.float64)
    return out


PATHS = {"parallel": A._attend_parallel, "blas": A._attend_blas}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("H,KVH,window", [(4, 4, 0), (9, 3, 0), (4, 1, 5)])
def test_attend_matches_reference(H, KVH, window, path):
    rng = np.random.default_rng(0)
    n, m, D = 7, 12, 16
    q = rng.standard_normal((n, H, D)).astype(np.float32)
    k = rng.standard_normal((m, KVH, D)).astype(np.float32)
    v = rng.standard_normal((m, KVH, D)).astype(np.float32)
    k_pos = np.arange(m, dtype=np.int64)
    k_pos[3] = -1  # an empty slot is never attended to
    q_pos = np.arange(m - n, m, dtype=np.int64)
    got = np.empty_like(q)
    kt = np.ascontiguousarray(k.transpose(1, 2, 0))
    PATHS[path](q, kt, v, k_pos, m, q_pos, np.float32(0.25), window, np.float32(0), False,
                A._NO_SINKS, got)
    want = ref_attention(q, k, v, q_pos, k_pos, 0.25, window)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", list(PATHS))
def test_attend_f16_weights(path):
    """f16=True rounds the normalized weights to float16 before they meet v: the result is
    the reference's with that rounding, and differs from the unrounded one."""
    rng = np.random.default_rng(1)
    n, m, H, D = 5, 40, 4, 16
    q = rng.standard_normal((n, H, D)).astype(np.float32)
    k = rng.standard_normal((m, 2, D)).astype(np.float32)
    v = rng.standard_normal((m, 2, D)).astype(np.float32)
    k_pos = np.arange(m, dtype=np.int64)
    q_pos = np.arange(m - n, m, dtype=np.int64)
    kt = np.ascontiguousarray(k.transpose(1, 2, 0))
    got = np.empty_like(q)
    PATHS[path](q, kt, v, k_pos, m, q_pos, np.float32(0.25), 0, np.float32(0), True,
                A._NO_SINKS, got)
    want = ref_attention(q, k, v, q_pos, k_pos, 0.25, f16=True)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    plain = ref_attention(q, k, v, q_pos, k_pos, 0.25)
    assert np.abs(got - plain).max() > 1e-5
    np.testing.assert_array_equal(attend(q, kt, v, k_pos, m, q_pos, 0.25, f16=True),
                                  attend(q, kt, v, k_pos, m, q_pos, 0.25, f16=True))


@pytest.mark.parametrize("path", list(PATHS))
def test_attend_sinks(path):
    """Per-head sinks join each softmax's normalization without a value, as gpt-oss's."""
    rng = np.random.default_rng(2)
    n, m, H, KVH, D = 6, 70, 6, 2, 16
    q = rng.standard_normal((n, H, D)).astype(np.float32)
    k = rng.standard_normal((m, KVH, D)).astype(np.float32)
    v = rng.standard_normal((m, KVH, D)).astype(np.float32)
    sinks = (rng.standard_normal(H) * 3).astype(np.float32)
    sinks[0] = 40.0   # a sink that dominates: that head's output all but vanishes
    k_pos = np.arange(m, dtype=np.int64)
    q_pos = np.arange(m - n, m, dtype=np.int64)
    kt = np.ascontiguousarray(k.transpose(1, 2, 0))
    got = np.empty_like(q)
    PATHS[path](q, kt, v, k_pos, m, q_pos, np.float32(0.25), 0, np.float32(0), False,
                sinks, got)
    want = ref_attention(q, k, v, q_pos, k_pos, 0.25, sinks=sinks)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.abs(got[:, 0]).max() < 1e-6
    assert np.abs(want - ref_attention(q, k, v, q_pos, k_pos, 0.25)).max() > 1e-2
    with pytest.raises(ValueError, match="sinks"):
        attend(q, kt, v, k_pos, m, q_pos, 0.25, sinks=sinks[:2])


@pytest.mark.parametrize("path", list(PATHS))
def test_attend_softcap_and_blind_query(path):
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 2, 8)).astype(np.float32) * 4
    k = rng.standard_normal((5, 1, 8)).astype(np.float32) * 4
    v = rng.standard_normal((5, 1, 8)).astype(np.float32)
    k_pos = np.array([3, 4, 5, 6, 7], dtype=np.int64)
    q_pos = np.array([1, 6], dtype=np.int64)  # the first query precedes every key
    got = np.empty_like(q)
    kt = np.ascontiguousarray(k.transpose(1, 2, 0))
    PATHS[path](q, kt, v, k_pos, 5, q_pos, np.float32(1.0), 0, np.float32(5.0), False,
                A._NO_SINKS, got)
    assert not got[0].any()
    s = np.einsum("hd,sd->hs", q[1].astype(np.float64), k[:, 0].astype(np.float64))
    s = 5.0 * np.tanh(s / 5.0)
    s[:, k_pos > 6] = -np.inf
    w = np.exp(s - s.max(1, keepdims=True))
    want = (w / w.sum(1, keepdims=True)) @ v[:, 0]
    np.testing.assert_allclose(got[1], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 20])
def test_half_copy_is_the_float_cache_rounded(n):
    """A cache's float16 copy (what decode attention reads, as llama.cpp's default cache
    holds keys and values) gives what float32 arrays of the rounded values give, to float32
    rounding (the Numba kernel against BLAS products), on every path, and
    the reference's result for those values; the float32 cache is unchanged."""
    rng = np.random.default_rng(4)
    H, KVH, D, m = 6, 2, 64, 300
    q = rng.standard_normal((n, H, D)).astype(np.float32)
    k = rng.standard_normal((m, KVH, D)).astype(np.float32)
    v = rng.standard_normal((m, KVH, D)).astype(np.float32)
    pos = np.arange(m, dtype=np.int64)
    c = LayerCache(KVH, D, n_ctx=m, half_copy=True)
    c.store(k, v, pos)
    assert c.kt16.dtype == np.float16 and c.nbytes == (c.kt.nbytes + c.v.nbytes) * 3 // 2
    np.testing.assert_array_equal(c.v, v)
    k16, v16 = (a.astype(np.float16).astype(np.float32) for a in (k, v))
    got = attend(q, c.kt16, c.v16, c.slot_pos, c.n_slots, pos[-n:], 0.2)
    want = attend(q, np.ascontiguousarray(k16.transpose(1, 2, 0)), v16, c.slot_pos,
                  c.n_slots, pos[-n:], 0.2)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got, ref_attention(q, k16, v16, pos[-n:], pos, 0.2),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="float32 or float16"):
        attend(q, c.kt, c.v16, c.slot_pos, m, pos[-n:], 0.2)


def test_ring_cache_decode_equals_full_attention():
    """A sliding-window ring cache fed chunk by chunk gives the same outputs as a full cache."""
    rng = np.random.default_rng(1)
    H, KVH, D, window, chunk, total = 4, 2, 8, 6, 4, 23
    ring = LayerCache(KVH, D, n_ctx=64, window=window, chunk=chunk)
    assert ring.capacity == window + chunk
    q = rng.standard_normal((total, H, D)).astype(np.float32)
    k = rng.standard_normal((total, KVH, D)).astype(np.float32)
    v = rng.standard_normal((total, KVH, D)).astype(np.float32)
    pos = np.arange(total, dtype=np.int64)
    want = ref_attention(q, k, v, pos, pos, 0.3, window)
    got = []
    s = 0
    for size in [4, 4, 1, 1, 3, 4, 1, 1, 4]:
        p = pos[s:s + size]
        ring.store(k[p], v[p], p)
        got.append(attend(q[p], ring.kt, ring.v, ring.slot_pos, ring.n_slots, p, 0.3, window))
        s += size
    np.testing.assert_allclose(np.concatenate(got), want, rtol=1e-5, atol=1e-5)


def test_cache_truncate():
    c = KVCache([LayerCache(1, 4, n_ctx=16), LayerCache(1, 4, n_ctx=16, window=4, chunk=2)], 16)
    pos = np.arange(5, dtype=np.int64)
    for layer in c.layers:
        layer.store(np.ones((5, 1, 4), np.float32), np.ones((5, 1, 4), np.float32), pos)
    c.n_past, c.tokens = 5, [1, 2, 3, 4, 5]
    assert c.truncate(4) and c.n_past == 4 and c.tokens == [1, 2, 3, 4]
    assert (c.layers[0].slot_pos[:5] == [0, 1, 2, 3, -1]).all()
    # the ring (6 slots) has kept positions 0..4; going back to 1 needs position 0: still there
    assert c.truncate(1)
    more = np.arange(1, 12, dtype=np.int64)
    for p in more:
        c.layers[1].store(np.ones((1, 1, 4), np.float32), np.ones((1, 1, 4), np.float32),
                          np.array([p]))
    c.n_past = 12
    # positions 0..5 have been overwritten: the ring cannot go back to 3
    assert not c.truncate(3) and c.n_past == 0
