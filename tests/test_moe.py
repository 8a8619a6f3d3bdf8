"""Routing as data: ``route`` against a float64 numpy reference for each gating, with and
without renormalisation and scaling, and the Routing each MoE model declares."""
from __future__ import annotations

import numpy as np
import pytest

from pocketlm.nn import moe


def _reference(logits, k, gating, renorm, scale):
    z = logits.astype(np.float64)
    if gating == "sigmoid":
        p = 1.0 / (1.0 + np.exp(-z))
    elif gating == "softmax_weight":
        p = z
    else:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
    ids = np.argsort(-p, axis=1)[:, :k]
    w = np.take_along_axis(p, ids, axis=1)
    if gating == "softmax_weight":
        w = np.exp(w) / np.exp(w).sum(axis=1, keepdims=True)
    if renorm:
        w = w / w.sum(axis=1, keepdims=True)
    return ids, w * scale


@pytest.mark.parametrize("gating", moe.GATINGS)
@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_route_matches_numpy(gating, renorm, scale):
    logits = np.random.default_rng(3).standard_normal((7, 16)).astype(np.float32) * 3
    r = moe.Routing(k=4, gating=gating, renorm=renorm, scale=scale)
    ids, w = moe.route(logits, r)
    want_ids, want_w = _reference(logits, 4, gating, renorm, scale)
    assert ids.shape == w.shape == (7, 4) and w.dtype == np.float32
    assert np.array_equal(ids, want_ids)
    np.testing.assert_allclose(w, want_w, rtol=1e-6)
    if renorm:
        np.testing.assert_allclose(w.sum(axis=1), scale, rtol=1e-6)


def test_renorm_clamps_a_vanishing_sum():
    """As llama.cpp: the sum is clamped, so near-zero sigmoid weights stay near zero."""
    ids, w = moe.route(np.full((1, 4), -40.0, np.float32), moe.Routing(2, "sigmoid"))
    assert np.all(w < 1e-12)


def test_routing_rejects_what_route_cannot_do():
    with pytest.raises(ValueError, match="gating function 'tanh'"):
        moe.Routing(2, "tanh")
    with pytest.raises(ValueError, match="at least one expert"):
        moe.Routing(0, "softmax")


def test_models_declare_their_routing(smallthinker_tiny_path, smollm2_path, tmp_path):
    from pocketlm.gguf.reader import open_gguf
    from pocketlm.models import load_model
    from pocketlm.tools.synth import Options, synthesize
    with open_gguf(smallthinker_tiny_path) as g:
        a = load_model(g).args
        assert a.routing == moe.Routing(a.n_expert_used, "sigmoid", renorm=True, scale=1.0)
    path = tmp_path / "moe.gguf"
    synthesize("minicpm-moe", path, Options(overrides=dict(
        n_layer=1, n_embd=64, n_head=2, n_head_kv=1, n_ff=64, n_ctx=64, dim_model_base=32)),
        tokenizer=smollm2_path)
    with open_gguf(path) as g:
        assert load_model(g).args.routing == moe.Routing(2, "softmax")
