"""InfLLM v2 block-sparse attention against a numpy re-derivation from the method's definition
(shared/specs/minicpm.md, section 7): compressed keys, block selection, attention output."""
from __future__ import annotations

import numpy as np
import pytest

from pocketlm import nn
from pocketlm.kernels.attention import attend
from pocketlm.kernels.sparse_attention import (CompressedKeys, SparseConfig, attend_sparse,
                                              select_blocks)
from pocketlm.nn.kvcache import LayerCache

SMALL = SparseConfig(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1,
                     window_size=32, topk=6, dense_len=0)


def ref_scores(q, K, i, cfg):
    """Block scores (float64) of the query q (G, D) at position i for one KV head's keys K."""
    p, s, B = cfg.kernel_size, cfg.kernel_stride, cfg.block_size
    n_c = (i + 1 - p) // s + 1 if i + 1 >= p else 0
    C = np.array([K[j * s:j * s + p].mean(0) for j in range(n_c)]).reshape(n_c, K.shape[1])
    S = np.zeros(n_c)
    for qg in q:
        z = C @ qg / np.sqrt(q.shape[1])
        e = np.exp(z - z.max()) if n_c else z
        S += e / e.sum() if n_c else e
    q_blk, m = i // B, B // s
    score = np.empty(q_blk + 1)
    for b in range(q_blk + 1):
        if b < cfg.init_blocks or b >= q_blk - cfg.window_size // B:
            score[b] = np.inf
        else:
            js = range(max(0, b * m - 1), min(n_c, b * m + m))
            score[b] = max((S[j] for j in js), default=-np.inf)
    return score


def ref_attend(q, K, V, i, blocks, B):
    """Softmax attention of q (G, D) over the tokens <= i of the given blocks."""
    idx = np.array([t for b in blocks for t in range(b * B, (b + 1) * B) if t <= i])
    z = q @ K[idx].T / np.sqrt(q.shape[1])
    w = np.exp(z - z.max(1, keepdims=True))
    return (w / w.sum(1, keepdims=True)) @ V[idx]


def _filled(T, KVH, D, cfg, seed=0):
    rng = np.random.default_rng(seed)
    K = rng.standard_normal((T, KVH, D)).astype(np.float32)
    V = rng.standard_normal((T, KVH, D)).astype(np.float32)
    cache = LayerCache(KVH, D, T)
    cache.store(K, V, np.arange(T))
    keys = CompressedKeys(KVH, D, T, cfg)
    keys.update(cache.kt, 0, T - 1)
    return K, V, cache, keys


@pytest.mark.parametrize("cfg,T,D", [(SMALL, 400, 16), (SparseConfig(dense_len=0), 5000, 16)])
def test_selection_and_output_match_numpy(cfg, T, D):
    KVH, G = 2, 3
    K, V, cache, keys = _filled(T, KVH, D, cfg)
    # compressed keys: means of complete windows only
    n_c = (T - cfg.kernel_size) // cfg.kernel_stride + 1
    assert keys.n == n_c
    j = n_c - 1
    want_c = K[j * cfg.kernel_stride:j * cfg.kernel_stride + cfg.kernel_size].mean(0)
    np.testing.assert_allclose(keys.c[:, :, j], want_c, atol=1e-6)
    rng = np.random.default_rng(1)
    pos = np.array([T - 1, T - 2, T // 2 + 5, 3 * cfg.block_size + 1, 7])
    q = rng.standard_normal((len(pos), KVH * G, D)).astype(np.float32)
    sel = select_blocks(q, keys, pos, 1 / np.sqrt(D))
    out = attend_sparse(q, cache.kt, cache.v, cache.slot_pos, cache.n_slots, pos,
                        1 / np.sqrt(D), keys)
    n_sparse = 0
    for t, i in enumerate(pos):
        for kh in range(KVH):
            qg = q[t, kh * G:(kh + 1) * G].astype(np.float64)
            score = ref_scores(qg, K[:, kh].astype(np.float64), i, cfg)
            got = sel[t][kh]
            k = min(cfg.topk, len(score))
            assert len(got) == k and np.all(np.diff(got) > 0)
            kth = np.sort(score)[::-1][k - 1]
            # everything strictly above the k-th score is kept, nothing below it
            # (blocks tied at the k-th score, e.g. sharing a boundary kernel, may swap)
            assert set(np.nonzero(score > kth * (1 + 1e-5))[0]) <= set(got.tolist())
            assert np.all(score[got] >= kth * (1 - 1e-5))
            n_sparse += len(score) > k
            want = ref_attend(qg, K[:, kh], V[:, kh], i, got, cfg.block_size)
            np.testing.assert_allclose(out[t, kh * G:(kh + 1) * G], want, atol=2e-5)
    assert n_sparse >= 2 * KVH   # the long queries really were sparse


def test_dense_below_switch_length_and_when_all_blocks_fit():
    D, KVH, G, T = 16, 2, 2, 300
    rng = np.random.default_rng(3)
    q = rng.standard_normal((4, KVH * G, D)).astype(np.float32)
    pos = np.array([299, 250, 120, 40])
    for cfg in (SparseConfig(**{**vars(SMALL), "dense_len": 1000}),
                SparseConfig(**{**vars(SMALL), "topk": 64})):
        _, _, cache, keys = _filled(T, KVH, D, cfg)
        dense = attend(q, cache.kt, cache.v, cache.slot_pos, cache.n_slots, pos, 0.25)
        got = attend_sparse(q, cache.kt, cache.v, cache.slot_pos, cache.n_slots, pos, 0.25,
                            keys)
        np.testing.assert_allclose(got, dense, atol=1e-5)


def test_needle_far_back_is_attended():
    """A key 3000 tokens back that matches the query stands out in its compressed kernels,
    so its block is selected and the output is the dense one."""
    D, KVH, G, T, needle = 32, 1, 4, 4096, 700
    cfg = SparseConfig(dense_len=0, topk=40, window_size=1024)
    rng = np.random.default_rng(4)
    K = 0.3 * rng.standard_normal((T, KVH, D)).astype(np.float32)
    V = rng.standard_normal((T, KVH, D)).astype(np.float32)
    u = rng.standard_normal(D).astype(np.float32)
    u /= np.linalg.norm(u)
    K[needle, 0] = 30 * u
    V[needle, 0] = 5.0
    cache = LayerCache(KVH, D, T)
    cache.store(K, V, np.arange(T))
    keys = CompressedKeys(KVH, D, T, cfg)
    keys.update(cache.kt, 0, T - 1)
    q = (np.tile(3 * u, (1, G, 1)) + 0.1 * rng.standard_normal((1, G, D))).astype(np.float32)
    pos = np.array([T - 1])
    sel = select_blocks(q, keys, pos, 1 / np.sqrt(D))[0][0]
    assert needle // cfg.block_size in sel.tolist()
    assert len(sel) == cfg.topk < T // cfg.block_size
    out = attend_sparse(q, cache.kt, cache.v, cache.slot_pos, cache.n_slots, pos,
                        1 / np.sqrt(D), keys)
    dense = attend(q, cache.kt, cache.v, cache.slot_pos, cache.n_slots, pos, 1 / np.sqrt(D))
    assert out[0, :, 0].min() > 4.0   # the needle's value dominates
    np.testing.assert_allclose(out, dense, atol=2e-2)


def test_layer_path_chunked_equals_stepwise_and_survives_rewrites():
    """nn.sparse_attention: keys compressed as the cache fills; a chunked prefill equals one
    token at a time; truncating and rewriting positions recomputes the affected kernels."""
    D, KVH, G, T = 16, 2, 2, 260
    rng = np.random.default_rng(5)
    q = rng.standard_normal((T, KVH * G, D)).astype(np.float32)
    k = rng.standard_normal((T, KVH, D)).astype(np.float32)
    v = rng.standard_normal((T, KVH, D)).astype(np.float32)
    pos = np.arange(T)

    def run(chunk, k=k):
        cache, keys = LayerCache(KVH, D, T), CompressedKeys(KVH, D, T, SMALL)
        outs = [nn.CPU.sparse_attention(q[s:s + chunk], k[s:s + chunk], v[s:s + chunk], cache,
                                    pos[s:s + chunk], 0.25, keys) for s in range(0, T, chunk)]
        return np.concatenate(outs), cache, keys

    full, cache, keys = run(T)
    np.testing.assert_allclose(run(1)[0], full, atol=1e-5)
    np.testing.assert_allclose(run(37)[0], full, atol=1e-5)
    # rewrite positions 200.. with other keys: same result as a fresh run with those keys
    k2 = k.copy()
    k2[200:] = rng.standard_normal((T - 200, KVH, D))
    cache.truncate(200)
    got = nn.CPU.sparse_attention(q[200:], k2[200:], v[200:], cache, pos[200:], 0.25, keys)
    np.testing.assert_allclose(got, run(T, k2)[0][200:], atol=1e-5)


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of kernel_stride"):
        SparseConfig(block_size=40, kernel_stride=16)
    with pytest.raises(ValueError, match="must be positive"):
        SparseConfig(topk=0)
    with pytest.raises(ValueError, match="global"):
        nn.CPU.sparse_attention(np.zeros((1, 2, 16), np.float32), np.zeros((1, 1, 16), np.float32),
                            np.zeros((1, 1, 16), np.float32), LayerCache(1, 16, 64, window=8),
                            np.zeros(1, np.int64), 0.25, CompressedKeys(1, 16, 64, SMALL))
