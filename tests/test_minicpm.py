"""MiniCPM (`minicpm` arch): tiny synthetic models against a float64 numpy forward written from
the architecture's definition and against llama.cpp's logits (tests/data/minicpm-reference.*,
made by tools/minicpm_reference.py); rope frequency factors; muP scales; LongRoPE choice; MoE;
sparse attention through the model; bad files."""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from pocketlm import LLM, kernels, nn
from pocketlm.generate.loop import prefill
from pocketlm.gguf.reader import open_gguf
from pocketlm.nn import SparseConfig
from pocketlm.tools import minicpm_reference as ref

from conftest import assert_llama_gates, decode_steps

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def models_dir():
    from pocketlm.api import store
    d = store.home() / "test-cache" / "minicpm"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _rope_ref(x, pos, base, ff, neox):
    n, H, D = x.shape
    ang = pos[:, None] * (base ** (-np.arange(0, D, 2) / D) / ff)[None, :]   # (n, D/2)
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    out = x.copy()
    i0, i1 = (slice(0, D // 2), slice(D // 2, D)) if neox else (slice(0, D, 2), slice(1, D, 2))
    a, b = x[..., i0], x[..., i1]
    out[..., i0], out[..., i1] = a * c - b * s, a * s + b * c
    return out


@pytest.mark.parametrize("mode", ["norm", "neox"])
def test_rope_frequency_factors(mode):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 32)).astype(np.float32)
    pos = np.array([0, 1, 17, 300, 4095])
    ff = rng.uniform(1, 8, 16).astype(np.float32)
    got = kernels.rope(x.copy(), pos, 32, 10000.0, mode, freq_factors=ff)
    want = _rope_ref(x.astype(np.float64), pos.astype(np.float64), 10000.0, ff, mode == "neox")
    # float32 angles, made by repeated multiplication as ggml does: ~1e-7 relative per step
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(got - _rope_ref(x.astype(np.float64), pos.astype(np.float64), 10000.0,
                                  np.ones(16), mode == "neox")).max() > 0.1
    with pytest.raises(ValueError, match="frequency factors"):
        kernels.rope(x, pos, 32, 10000.0, mode, freq_factors=ff[:8])


class Float64MiniCPM:
    """The architecture from its definition (spec section 4), in float64 on the file's weights
    (read with gguf-py and dequantized by it)."""

    def __init__(self, path, n_ctx):
        r = gguf.GGUFReader(str(path))
        with open_gguf(path) as g:
            meta = dict(g.metadata)

        def val(key, default=None):
            return meta.get(f"minicpm.{key}", default)

        self.t = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
                  .reshape([int(d) for d in reversed(t.shape)]) for t in r.tensors}
        self.L, d = val("block_count"), val("embedding_length")
        self.H, self.KVH = val("attention.head_count"), val("attention.head_count_kv")
        self.hd, self.eps = d // self.H, val("attention.layer_norm_rms_epsilon")
        self.es = val("embedding_scale", 12.0)
        self.rs = val("residual_scale", 1.4 / np.sqrt(self.L))
        self.ls = val("logit_scale", 256.0 / d)        # llama.cpp's default, see the model
        self.k = val("expert_used_count", 0)
        self.ff = np.ones(self.hd // 2)
        if val("rope.scaling.type") == "longrope":
            which = "long" if n_ctx > val("context_length") else "short"
            self.ff = self.t[f"rope_factors_{which}.weight"]

    def logits(self, ids):
        t, n = self.t, len(ids)
        rms = lambda x, w: x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * w  # noqa
        pos = np.arange(n, dtype=np.float64)
        x = self.es * t["token_embd.weight"][ids]
        g = self.H // self.KVH
        for i in range(self.L):
            W = {k.split(".", 2)[2]: v for k, v in t.items() if k.startswith(f"blk.{i}.")}
            h = rms(x, W["attn_norm.weight"])
            q = _rope_ref((h @ W["attn_q.weight"].T).reshape(n, self.H, self.hd), pos, 1e4,
                          self.ff, False)
            k = _rope_ref((h @ W["attn_k.weight"].T).reshape(n, self.KVH, self.hd), pos, 1e4,
                          self.ff, False)
            v = (h @ W["attn_v.weight"].T).reshape(n, self.KVH, self.hd)
            o = np.zeros((n, self.H, self.hd))
            for hh in range(self.H):
                s = q[:, hh] @ k[:, hh // g].T / np.sqrt(self.hd)
                s = np.where(np.tri(n, dtype=bool), s, -np.inf)
                e = np.exp(s - s.max(1, keepdims=True))
                o[:, hh] = e / e.sum(1, keepdims=True) @ v[:, hh // g]
            x = x + self.rs * (o.reshape(n, -1) @ W["attn_output.weight"].T)
            h = rms(x, W["ffn_norm.weight"])
            swiglu = lambda h, wg, wu, wd: (  # noqa
                (h @ wg.T) / (1 + np.exp(-(h @ wg.T))) * (h @ wu.T)) @ wd.T
            if self.k:
                z = h @ W["ffn_gate_inp.weight"].T                       # (n, E)
                p = np.exp(z - z.max(1, keepdims=True))
                p /= p.sum(1, keepdims=True)
                y = np.zeros_like(h)
                for r in range(n):
                    top = np.argsort(-p[r])[:self.k]
                    w = p[r, top] / p[r, top].sum()
                    for e, we in zip(top, w):
                        y[r] += we * swiglu(h[r:r + 1], W["ffn_gate_exps.weight"][e],
                                            W["ffn_up_exps.weight"][e],
                                            W["ffn_down_exps.weight"][e])[0]
            else:
                y = swiglu(h, W["ffn_gate.weight"], W["ffn_up.weight"], W["ffn_down.weight"])
            x = x + self.rs * y
        return rms(x, t["output_norm.weight"]) @ t["token_embd.weight"].T / self.ls


@pytest.fixture(scope="session")
def reference():
    meta = json.loads((DATA / "minicpm-reference.json").read_text())
    return meta, np.load(DATA / "minicpm-reference.npz")


@pytest.fixture(scope="session")
def model_paths(models_dir):
    return {name: ref.make_model(name, models_dir) for name in ref.MODELS}


@pytest.mark.parametrize("run", list(ref.RUNS))
def test_matches_llama_cpp_and_float64(run, reference, model_paths):
    meta, logits = reference
    name, n_ctx = ref.RUNS[run]
    assert ref.sha256(model_paths[name]) == meta["models"][name]["sha256"], \
        f"{name}: the regenerated model differs from the one the reference was made from"
    exact = Float64MiniCPM(model_paths[name], n_ctx)
    with LLM.load(str(model_paths[name]), n_ctx=n_ctx) as llm:
        for i, p in enumerate(meta["prompts"]):
            got = llm.eval(p)                                            # (n, n_vocab)
            want = logits[f"{run}/prompt{i}"]
            assert_llama_gates(got, want, f"{run} prompt {i}")
            f64 = exact.logits(np.array(p))
            got = llm.eval(p)   # a prompt: float activations, float64 math's rounding
            rel = np.abs(got - f64).max() / f64.std()
            assert rel <= 1e-3, f"{run} prompt {i}: {rel:.1e} of the logit scale from float64"
        # one token at a time through the cache gives the batch result (float activations:
        # with 8-bit ones decode and BLAS batches round differently, as in llama.cpp)
        steps = decode_steps(llm.model, p, nn.EXACT)
        np.testing.assert_allclose(steps, got, atol=1e-4)


def test_mup_scales_change_logits_as_llama_cpp(reference, model_paths):
    """Same weights, three sets of scale keys. Without keys llama.cpp divides by 256/n_embd
    = 2 instead of n_embd/32 = 4 (the preset's value), so those logits are exactly twice as
    large; other embedding/residual scales change them entirely, as in llama.cpp."""
    meta, logits = reference
    p = meta["prompts"][2]
    out = {}
    for name in ("tiny", "tiny-nokeys", "tiny-mup"):
        warns = pytest.warns(UserWarning, match="logit_scale") if name == "tiny-nokeys" \
            else contextlib.nullcontext()
        with warns, LLM.load(str(model_paths[name])) as llm:
            out[name] = llm.eval(p)
    np.testing.assert_allclose(out["tiny-nokeys"], 2 * out["tiny"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits["tiny-nokeys/prompt2"], 2 * logits["tiny/prompt2"],
                               atol=0.02)
    assert np.abs(out["tiny-mup"] - out["tiny"]).max() > 0.5
    assert np.abs(logits["tiny-mup/prompt2"] - logits["tiny/prompt2"]).max() > 0.5


def test_longrope_factor_choice_follows_context(reference, model_paths):
    """llama.cpp takes the long factors when the configured context exceeds the trained one."""
    meta, logits = reference
    p = meta["prompts"][2]
    short = logits["tiny-longrope-short/prompt2"]
    long_ = logits["tiny-longrope-long/prompt2"]
    assert np.abs(short - long_).max() > 0.1
    with LLM.load(str(model_paths["tiny-longrope"]), n_ctx=257) as llm:
        assert np.abs(llm.eval(p) - long_).max() <= 0.05
    with LLM.load(str(model_paths["tiny-longrope"]), n_ctx=256) as llm:
        assert np.abs(llm.eval(p) - short).max() <= 0.05


def test_moe_routes_through_runtime_moe(model_paths, monkeypatch):
    """MiniCPM-MoE uses pocketlm.nn.moe: softmax gating, top-2, renormalised."""
    from pocketlm.nn import moe
    seen = []
    real = moe.route

    def spy(logits, routing):
        seen.append(routing)
        return real(logits, routing)

    monkeypatch.setattr(moe, "route", spy)
    with LLM.load(str(model_paths["tiny-moe"])) as llm:
        llm.eval([1, 5, 9])
    assert seen and set(seen) == {moe.Routing(k=2, gating="softmax", renorm=True, scale=1.0)}


# 8 blocks of 16 tokens kept: sparse from position 128 on ("on"), from 191 on ("auto")
SMALL = SparseConfig(kernel_size=8, kernel_stride=4, block_size=16, window_size=32, topk=8,
                     dense_len=192)


def test_sparse_attention_in_the_model(model_paths):
    """InfLLM v2 with small blocks on a 250-token input: exact below the switch length and
    while all blocks fit, close to dense after; prefill in chunks of 7 (crossing the switch)
    and then token-by-token decode give the one-batch result (float activations, so that
    chunks and batches round alike)."""
    ids = [int(t) for t in np.random.default_rng(0).integers(3, 512, 250)]
    with LLM.load(str(model_paths["tiny"]), n_ctx=256, sparse_attention="off") as llm:
        dense = llm.eval(ids)
        m = llm.model
        m.args = dataclasses.replace(m.args, sparse=SMALL)
        m.configure(n_ctx=256, sparse_attention="auto")
        auto = llm.eval(ids)
        cache = m.new_cache(256, 7)
        steps = np.concatenate([prefill(m, cache, ids[:236], chunk=7, n_logits=None)] +
                               [prefill(m, cache, [t], chunk=1) for t in ids[236:]])
        m.configure(n_ctx=256, sparse_attention="on")
        on = llm.eval(ids)
    scale = np.abs(dense).max()
    np.testing.assert_allclose(auto[:191], dense[:191], atol=1e-4)
    np.testing.assert_allclose(on[:128], dense[:128], atol=1e-4)
    for got, first in ((auto, 191), (on, 128)):
        d = np.abs(got[first:] - dense[first:]).max()
        assert 1e-3 < d < 0.5 * scale, d
    np.testing.assert_allclose(steps, auto, atol=1e-4)


def _meta(**kv):
    base = {"general.architecture": "minicpm", "tokenizer.ggml.tokens": ["a"] * 8,
            "minicpm.block_count": 2, "minicpm.embedding_length": 64,
            "minicpm.feed_forward_length": 128, "minicpm.attention.head_count": 4,
            "minicpm.attention.layer_norm_rms_epsilon": 1e-5}
    return {**base, **{f"minicpm.{k}": v for k, v in kv.items()}}


def test_metadata_defaults_and_errors():
    from pocketlm.models.minicpm import ModelArgs
    with pytest.warns(UserWarning, match="logit_scale"):
        a = ModelArgs.from_gguf(_meta())
    # llama.cpp's defaults when the keys are missing
    assert (a.embedding_scale, a.logit_scale) == (12.0, 256 / 64)
    assert a.residual_scale == pytest.approx(1.4 / np.sqrt(2))
    assert a.sparse == SparseConfig() and not a.longrope and a.n_expert == 0
    b = ModelArgs.from_gguf(_meta(logit_scale=9.0, **{"sparse.block_size": 32,
                                                      "sparse.dense_len": 0,
                                                      "rope.scaling.type": "longrope"}))
    assert b.sparse.block_size == 32 and b.sparse.dense_len == 0 and b.longrope
    with pytest.raises(ValueError, match="logit_scale must be non-zero"):
        ModelArgs.from_gguf(_meta(logit_scale=0.0))
    with pytest.raises(ValueError, match="multiple of kernel_stride"):
        ModelArgs.from_gguf(_meta(logit_scale=1.0, **{"sparse.block_size": 40}))
    with pytest.raises(ValueError, match="dimension_count"):
        ModelArgs.from_gguf(_meta(logit_scale=1.0, **{"rope.dimension_count": 8}))


def test_bad_settings(model_paths, smollm2_path):
    with pytest.raises(ValueError, match="sparse_attention 'yes'"):
        LLM.load(str(model_paths["tiny"]), sparse_attention="yes")
    with pytest.raises(ValueError, match="no sparse attention"):
        LLM.load(str(smollm2_path), sparse_attention="on")
