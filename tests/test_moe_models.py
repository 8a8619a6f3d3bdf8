"""The llama-shaped MoE architectures (qwen3moe, qwen2moe, Mixtral-style llama, olmoe,
granitemoe) and gpt-oss: tiny synthetic models against llama.cpp's logits (tests/data/moe-reference.*,
made by tools/moe_reference.py) and the float64 forward; streaming under every policy never
changes a number, and predicts the next layer from the FFN input; bad files are refused."""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pocketlm import LLM, nn
from pocketlm.experts.cache import ExpertCache
from pocketlm.experts.policies import POLICIES
from pocketlm.experts.store import ExpertStore
from pocketlm.gguf.reader import open_gguf
from pocketlm.models import ARCHITECTURES, load_model, qwen2moe, qwen3moe
from pocketlm.tools import moe_reference as ref, synth_gpt_oss, synth_moe
from pocketlm.tools.synth import Options, presets
from pocketlm.tools.minicpm_reference import sha256

from conftest import assert_llama_gates, decode_steps
from test_experts import _run, streamed_vs_resident
from test_models_tiny import Float64MoE

DATA = Path(__file__).parent / "data"
IDS = [int(i) for i in np.random.default_rng(5).integers(3, 512, size=28)]


@pytest.fixture(scope="session")
def reference():
    meta = json.loads((DATA / "moe-reference.json").read_text())
    return meta, np.load(DATA / "moe-reference.npz")


@pytest.fixture(scope="session")
def model_paths():
    from pocketlm.api import store
    d = store.home() / "test-cache" / "moe"
    d.mkdir(parents=True, exist_ok=True)
    return {name: ref.make_model(name, d) for name in ref.MODELS}


@pytest.mark.parametrize("run", list(ref.RUNS))
def test_matches_llama_cpp_and_float64(run, reference, model_paths):
    meta, logits = reference
    name, n_ctx = ref.RUNS[run]
    assert sha256(model_paths[name]) == meta["models"][name]["sha256"], \
        f"{name}: the regenerated model differs from the one the reference was made from"
    # llama.cpp's arithmetic (8-bit activations, F16 attention without flash attention, as
    # the reference was made): next-token logits within the flat 0.05, prompt and decode.
    # Rounding boundaries that fall differently still move these chaotic weights by a few
    # hundredths; exact math sits 0.03-0.10 away, as far as llama.cpp with flash attention.
    with LLM.load(str(model_paths[name]), n_ctx=n_ctx, numerics="llama") as llm:
        for i, p in enumerate(meta["prompts"]):
            want = logits[f"{run}/prompt{i}"]
            assert_llama_gates(llm.eval(p), want, f"{run} prompt {i}", tol=0.05)
            assert_llama_gates(decode_steps(llm.model, p, nn.LLAMA), want,
                               f"{run} prompt {i} decoded", tol=0.05)
    exact = Float64MoE(model_paths[name])
    with LLM.load(str(model_paths[name]), n_ctx=n_ctx) as llm:   # default: float prompts
        for i, p in enumerate(meta["prompts"]):
            got = llm.eval(p)                                            # (n, n_vocab)
            want = logits[f"{run}/prompt{i}"]
            assert_llama_gates(got, want, f"{run} prompt {i}")
            rel = np.abs(got - exact.logits(np.array(p))).max() / want.std()
            assert rel <= 1e-3, f"{run} prompt {i}: {rel:.1e} of the logit scale from float64"
        steps = decode_steps(llm.model, p, nn.EXACT)
        np.testing.assert_allclose(steps, got, atol=1e-4)


@pytest.mark.parametrize("name", list(ref.MODELS))
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_streaming_never_changes_a_number(model_paths, name, policy):
    with open_gguf(model_paths[name]) as g:
        # 3 slots for 8 experts a layer: evictions and speculative reads in every step
        want, got, stats = streamed_vs_resident(g, load_model(g), policy, 3, IDS)
    assert np.array_equal(got, want)
    assert stats.evictions > 0


@pytest.mark.parametrize("name", list(ref.MODELS))
def test_next_layer_is_predicted_from_the_ffn_input(model_paths, name):
    """The model hands each layer's FFN input with its request, so the cache predicts layer
    l+1 by applying its router to it (a post-attention router reads nothing earlier)."""
    with open_gguf(model_paths[name]) as g:
        model = load_model(g)
        seen = []
        model.experts = src = SimpleNamespace(request=lambda i, ids, x=None: seen.append(
            (i, x)), each=model.experts.each, groups=model.experts.groups,
            neurons=None)
        model.forward(np.array(IDS[:4]), np.arange(4), model.new_cache(8))
        assert [i for i, _ in seen] == list(range(model.args.n_layer))
        assert all(x is not None and x.shape == (4, model.args.n_embd) for _, x in seen)
        del src
        cache = ExpertCache(ExpertStore.from_gguf(g), 16, routers=model.routers)
        try:
            model.experts = cache
            _run(model, IDS[:8], 4)
            s = cache.snapshot()
        finally:
            cache.close()
    assert s.pred_n > 0 and 0 < s.precision <= 1 and 0 < s.recall <= 1


def test_metadata_and_shapes_are_checked(model_paths):
    base = {"general.architecture": "qwen3moe", "tokenizer.ggml.tokens": ["a"] * 8,
            "qwen3moe.block_count": 1, "qwen3moe.embedding_length": 64,
            "qwen3moe.attention.head_count": 4, "qwen3moe.feed_forward_length": 128,
            "qwen3moe.expert_count": 4, "qwen3moe.expert_used_count": 2}
    a = qwen3moe.ModelArgs.from_gguf(base)
    assert (a.n_ff_exp, a.routing.renorm) == (64, True)   # llama.cpp: n_ff / n_expert_used
    for key, msg in (("qwen3moe.expert_count", "lacks qwen3moe.expert_count"),
                     ("qwen3moe.expert_used_count", "lacks qwen3moe.expert_used_count")):
        with pytest.raises(ValueError, match=msg):
            qwen3moe.ModelArgs.from_gguf({k: v for k, v in base.items() if k != key})
    with pytest.raises(ValueError, match="expert_used_count is 0, expected >= 1"):
        qwen3moe.ModelArgs.from_gguf({**base, "qwen3moe.expert_used_count": 0})
    q2 = qwen2moe.ModelArgs.from_gguf({**{k.replace("qwen3moe", "qwen2moe"): v
                                          for k, v in base.items()},
                                       "general.architecture": "qwen2moe"})
    assert (q2.n_ff_shexp, q2.routing.renorm) == (128, False)
    with open_gguf(model_paths["qwen3moe"]) as g:
        model = load_model(g)
        w = model.w
        bad = SimpleNamespace(**{**vars(w), "blk": [SimpleNamespace(**vars(L)) for L in w.blk]})
        bad.blk[1].attn_k_norm = np.ones(7, np.float32)
        with pytest.raises(ValueError, match=r"tensor blk.1.attn_k_norm has shape \(7,\), "
                                             r"expected \(32,\)"):
            model.args.check(bad)
        del bad.blk[0].ffn_up_exps
        with pytest.raises(ValueError, match="model lacks tensor blk.0.ffn_up_exps"):
            model.args.check(bad)


@pytest.mark.parametrize("preset", [p for p, mod in presets().items()
                                    if mod.build.__module__ in (synth_moe.__name__,
                                                                synth_gpt_oss.__name__)])
def test_every_preset_is_a_model_its_architecture_accepts(preset):
    """Each preset's metadata and tensor shapes (not written) pass the model's own checks;
    the 30B-A3B shape has Qwen3-30B-A3B's parameter count with Qwen's vocabulary, the 20B
    gpt-oss shape gpt-oss-20b's (20.9 B) with o200k's."""
    mod = presets()[preset]
    n_vocab = {"qwen3moe-30b-a3b": 151936, "gpt-oss-20b": 201088}.get(preset, 512)
    m = mod.build(mod.PRESETS[preset], Options(), n_vocab)
    meta = {"general.architecture": m.arch, "tokenizer.ggml.tokens": ["t"] * n_vocab,
            **{k: v for k, v, _ in m.metadata}}
    top, blk = {}, {}
    for t in m.tensors:
        parts = t.name.split(".")
        key = parts[-2] + ("_b" if parts[-1] == "bias" else "")
        value = np.zeros(t.shape, np.float32) if len(t.shape) == 1 else \
            SimpleNamespace(shape=t.shape, qtype=t.qtype)
        (blk.setdefault(int(parts[1]), {}) if parts[0] == "blk" else top)[key] = value
    w = SimpleNamespace(**top, blk=[SimpleNamespace(**blk[i]) for i in sorted(blk)])
    args = importlib.import_module(ARCHITECTURES[m.arch]).ModelArgs.from_gguf(meta)
    args.check(w)
    assert args.n_expert == mod.PRESETS[preset]["n_expert"] and args.routing is not None
    n = sum(int(np.prod(t.shape)) for t in m.tensors)
    if preset == "qwen3moe-30b-a3b":
        assert 30.4e9 < n < 30.6e9, n
    if preset == "gpt-oss-20b":
        assert 20.85e9 < n < 20.95e9, n
