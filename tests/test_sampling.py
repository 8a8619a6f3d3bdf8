"""Samplers and penalties vs plain numpy references written from llama.cpp's definitions."""
from __future__ import annotations

import time

import numpy as np
import pytest

from pocketlm.generate.sampling import make_logits_processors, make_sampler, sampling_distribution


def ref_distribution(logits, temperature, top_k, top_p, min_p):
    """Full-sort reference of llama.cpp's chain top_k → top_p → min_p → temp → dist."""
    x = np.asarray(logits, dtype=np.float64)
    order = np.argsort(-x, kind="stable")
    if top_k > 0:
        order = order[:top_k]
    if top_p < 1.0:
        p = np.exp(x[order] - x[order].max())
        p /= p.sum()
        cum = 0.0
        for i, pi in enumerate(p):
            cum += pi
            if cum >= top_p:
                order = order[:i + 1]
                break
    if min_p > 0.0:
        p = np.exp(x[order] - x[order].max())
        p /= p.sum()
        keep = p >= min_p * p.max()
        order = order[keep] if keep.any() else order[:1]
    w = np.exp((x[order] - x[order].max()) / temperature)
    return order, w / w.sum()


def _as_dense(ids, probs, n):
    d = np.zeros(n)
    d[ids] = probs
    return d


def _logits(n, seed=0, scale=3.0):
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


CONFIGS = [
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),     # plain softmax
    dict(temperature=1.0, top_k=10, top_p=1.0, min_p=0.0),    # top_k alone
    dict(temperature=1.0, top_k=0, top_p=0.9, min_p=0.0),     # top_p alone
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.1),     # min_p alone
    dict(temperature=0.5, top_k=0, top_p=1.0, min_p=0.0),     # temperature alone
    dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),  # llama.cpp defaults
    dict(temperature=1.3, top_k=20, top_p=0.5, min_p=0.02),
    dict(temperature=0.7, top_k=0, top_p=0.8, min_p=0.01),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("n", [50, 5000, 262144])
def test_distribution_matches_reference(cfg, n):
    x = _logits(n, seed=n)
    ids, probs = sampling_distribution(x, **cfg)
    rids, rprobs = ref_distribution(x, **cfg)
    assert set(ids.tolist()) == set(rids.tolist())
    np.testing.assert_allclose(_as_dense(ids, probs, n), _as_dense(rids, rprobs, n), atol=1e-9)
    assert np.all(np.diff(probs) <= 1e-12)  # most likely first


def test_top_p_head_growth_on_flat_logits():
    # nearly flat logits: top_p needs far more than the first sorted head
    x = (np.random.default_rng(3).standard_normal(262144) * 0.01).astype(np.float32)
    ids, probs = sampling_distribution(x, temperature=1.0, top_k=0, top_p=0.9, min_p=0.0)
    rids, rprobs = ref_distribution(x, 1.0, 0, 0.9, 0.0)
    assert ids.shape == rids.shape and set(ids.tolist()) == set(rids.tolist())


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[5], CONFIGS[6]],
                         ids=["softmax", "defaults", "mixed"])
def test_empirical_frequencies(cfg):
    n = 30
    x = _logits(n, seed=7, scale=1.5)
    sampler = make_sampler(seed=1234, **cfg)
    draws = np.array([sampler(x) for _ in range(20000)])
    rids, rprobs = ref_distribution(x, **cfg)
    assert set(np.unique(draws).tolist()) <= set(rids.tolist())
    freq = np.bincount(draws, minlength=n) / draws.size
    expected = _as_dense(rids, rprobs, n)
    # binomial standard error at 20k draws is <= 0.0036; allow ~4 sigma
    assert np.max(np.abs(freq - expected)) < 0.015


def test_greedy():
    x = _logits(1000, seed=5)
    for t in (0.0, -1.0):
        s = make_sampler(temperature=t, seed=0)
        assert all(s(x) == int(np.argmax(x)) for _ in range(10))
    ids, probs = sampling_distribution(x, temperature=0.0)
    assert ids.tolist() == [int(np.argmax(x))] and probs.tolist() == [1.0]


def test_top_k_one_is_greedy():
    x = _logits(1000, seed=6)
    s = make_sampler(temperature=1.5, top_k=1, top_p=1.0, min_p=0.0, seed=9)
    assert {s(x) for _ in range(50)} == {int(np.argmax(x))}


def test_same_seed_same_tokens():
    xs = [_logits(5000, seed=i, scale=1.0) for i in range(50)]
    a = make_sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42)
    b = make_sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42)
    c = make_sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=43)
    ta, tb, tc = [a(x) for x in xs], [b(x) for x in xs], [c(x) for x in xs]
    assert ta == tb
    assert ta != tc


def test_masked_logits_never_sampled():
    x = _logits(100, seed=8, scale=0.1)
    x[::2] = -np.inf
    s = make_sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0)
    assert all(s(x) % 2 == 1 for _ in range(500))
    assert make_sampler(seed=0)(np.full(10, -np.inf, dtype=np.float32)) == 0


def test_fast_on_262k_vocab():
    x = _logits(262144, seed=11)
    s = make_sampler(seed=0)  # llama.cpp defaults: top_k 40
    s(x)
    t0 = time.perf_counter()
    for _ in range(20):
        s(x)
    per = (time.perf_counter() - t0) / 20
    assert per < 0.02, f"{per * 1e3:.1f} ms per token"


# ---- penalties ----------------------------------------------------------------------------

def ref_penalties(logits, tokens, rep, freq, pres, last_n):
    out = np.array(logits, dtype=np.float64)
    window = tokens if last_n < 0 else tokens[len(tokens) - last_n:] if last_n else []
    counts = {}
    for t in window:
        counts[t] = counts.get(t, 0) + 1
    for t, c in counts.items():
        if out[t] <= 0:
            out[t] *= rep
        else:
            out[t] /= rep
        out[t] -= c * freq + (1.0 if c > 0 else 0.0) * pres
    return out


def test_neutral_penalties_are_no_processors():
    assert make_logits_processors() == []
    assert make_logits_processors(repetition_penalty=1.3, last_n=0) == []


@pytest.mark.parametrize("rep,freq,pres,last_n", [
    (1.3, 0.0, 0.0, 64),
    (1.0, 0.5, 0.0, 64),
    (1.0, 0.0, 0.7, 64),
    (1.1, 0.2, 0.3, 8),
    (0.9, 0.1, 0.0, -1),
])
def test_penalties_match_reference(rep, freq, pres, last_n):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(200).astype(np.float32) * 2
    tokens = rng.integers(0, 40, size=100).tolist()
    (proc,) = make_logits_processors(rep, freq, pres, last_n)
    before = x.copy()
    out = proc(x, tokens)
    np.testing.assert_array_equal(x, before)  # input untouched
    np.testing.assert_allclose(out, ref_penalties(x, tokens, rep, freq, pres, last_n), rtol=1e-6,
                               atol=1e-6)


def test_repetition_penalty_sign_rule_and_empty_history():
    (proc,) = make_logits_processors(repetition_penalty=2.0)
    out = proc(np.array([4.0, -4.0, 0.0, 1.0], dtype=np.float32), [0, 1, 2, 0])
    np.testing.assert_allclose(out, [2.0, -8.0, 0.0, 1.0])
    np.testing.assert_array_equal(proc(np.ones(3, dtype=np.float32), []), np.ones(3))


def test_penalties_then_greedy_avoid_repeat():
    (proc,) = make_logits_processors(presence_penalty=5.0)
    x = np.array([3.0, 2.0, 1.0], dtype=np.float32)
    greedy = make_sampler(temperature=0)
    assert greedy(x) == 0
    assert greedy(proc(x, [0])) == 1


@pytest.mark.parametrize("cfg", [dict(top_k=0, top_p=1.0, min_p=0.0),   # block-sum draw path
                                 dict(top_k=0, top_p=0.9, min_p=0.0)],  # value-sort top_p path
                         ids=["nofilter", "top_p"])
def test_large_vocab_sampling_paths(cfg):
    n = 9001  # not a multiple of the draw block
    x = np.full(n, -2.0, dtype=np.float32)
    x[[5, 1234, 4096, 9000]] = [4.0, 3.5, 3.0, 2.0]
    x[::7] = -np.inf  # the -2.0 plateau also puts the top_p cutoff among ties
    sampler = make_sampler(temperature=1.0, seed=5, **cfg)
    draws = np.array([sampler(x) for _ in range(10000)])
    rids, rprobs = ref_distribution(x, temperature=1.0, **cfg)
    expected = _as_dense(rids, rprobs, n)
    assert set(np.unique(draws).tolist()) <= set(rids.tolist())
    freq = np.bincount(draws, minlength=n) / draws.size
    heads = [5, 1234, 4096, 9000]
    np.testing.assert_allclose(freq[heads], expected[heads], atol=0.02)
    rest = np.ones(n, bool)
    rest[heads] = False
    assert abs(freq[rest].sum() - expected[rest].sum()) < 0.02
