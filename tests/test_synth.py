"""Synthetic model generator (tools.synth): the written GGUF against the reference tiny model,
gguf's own reader and llama.cpp's converter keys; layouts, errors and routing statistics."""
from __future__ import annotations

import hashlib
import json
from collections import Counter

import gguf
import numpy as np
import pytest

from pocketlm import quant
from pocketlm.apps.cli import main
from pocketlm.models import load_model
from pocketlm import LLM
from pocketlm.generate.loop import prefill
from pocketlm.gguf.reader import open_gguf
from pocketlm.tools.synth import Options, routing_stats, synthesize, trace_routing

from conftest import TINY_DESCRIPTION, TINY_NAME, TINY_SHA256

PROMPT = "Mixture-of-experts layers route each token to a few experts. The router reads"


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """A vocab-only GGUF of 128 tokens: small models whose files gguf's reader parses fast."""
    path = tmp_path_factory.mktemp("vocab") / "vocab.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"t{i}" for i in range(128)])
    w.add_token_types([1] * 128)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_path):
    """The tiny preset with the default (routed) recipe, Q4_0."""
    out = tmp_path_factory.mktemp("synth") / "tiny.gguf"
    synthesize("tiny", out, Options(), tokenizer=smollm2_path)
    return out


def test_plain_recipe_reproduces_the_reference_tiny_model(tmp_path, smollm2_path):
    """Byte for byte the file llama.cpp's tiny-model references were made from."""
    out = tmp_path / "tiny-plain.gguf"
    synthesize("tiny", out, Options(recipe="plain", seed=1234, name=TINY_NAME,
                                    description=TINY_DESCRIPTION), tokenizer=smollm2_path)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == TINY_SHA256


def test_gguf_reader_parses_it_with_converter_keys(tmp_path, small_vocab):
    out = tmp_path / "tiny.gguf"
    synthesize("tiny", out, Options(), tokenizer=small_vocab)
    r = gguf.GGUFReader(str(out))
    f = {k: v.contents() for k, v in r.fields.items()
         if not k.startswith(("GGUF.", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                              "tokenizer.ggml.token_type"))}
    arch = "smallthinker."
    # keys llama.cpp's converter writes for SmallThinker (spec section 2), at the tiny shape
    assert f["general.architecture"] == "smallthinker"
    assert {k: f[arch + k] for k in (
        "context_length", "embedding_length", "block_count", "feed_forward_length",
        "expert_feed_forward_length", "attention.head_count", "attention.head_count_kv",
        "attention.key_length", "attention.value_length", "expert_count", "expert_used_count",
        "expert_gating_func")} == {
        "context_length": 4096, "embedding_length": 256, "block_count": 4,
        "feed_forward_length": 128, "expert_feed_forward_length": 128,
        "attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 64,
        "attention.value_length": 64, "expert_count": 8, "expert_used_count": 2,
        "expert_gating_func": 2}
    assert f[arch + "rope.freq_base"] == 1.5e6
    assert f[arch + "attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert arch + "attention.sliding_window" not in f
    assert f[arch + "vocab_size"] == 128 and f["general.file_type"] == 2
    assert f["tokenizer.ggml.pre"] == "default"
    types = {t.name: (t.tensor_type.name, [int(n) for n in t.shape]) for t in r.tensors}
    assert types["token_embd.weight"] == ("Q4_0", [256, 128])
    assert types["blk.3.ffn_gate_inp.weight"] == ("F32", [256, 8])
    assert types["blk.3.ffn_down_exps.weight"] == ("Q4_0", [128, 256, 8])
    assert types["output_norm.weight"] == ("F32", [256])


def test_same_layout_as_the_reference_tiny_model(tiny, smallthinker_tiny_path):
    """Same keys, tensors, shapes and types as the reference tiny model (the plain recipe)."""
    def scalars(g):
        return [(k, v) for k, v in g.metadata.items() if not k.startswith("general.")
                and not isinstance(v, (list, np.ndarray))]

    with open_gguf(tiny) as g, open_gguf(smallthinker_tiny_path) as ref:
        assert list(g.metadata) == list(ref.metadata)
        assert scalars(g) == scalars(ref)
        # (the data starts elsewhere: general.description differs)
        assert [(t.name, t.qtype, t.shape, t.offset - g.data_offset) for t in g.tensors.values()] \
            == [(t.name, t.qtype, t.shape, t.offset - ref.data_offset)
                for t in ref.tensors.values()]
        # the routed recipe rescales the attention output projections and nothing else
        differ = [n for n in g.tensors if g.raw(n).tobytes() != ref.raw(n).tobytes()]
        assert differ == [f"blk.{i}.attn_output.weight" for i in range(4)]


def test_tiny_loads_and_generates(tiny):
    with LLM.load(str(tiny), n_ctx=256) as llm:
        assert llm.model.args.n_expert == 8 and llm.model.args.n_expert_used == 2
        r = llm.generate(PROMPT, max_tokens=8, temperature=0)
        assert len(r.tokens) == 8
        logits = llm.eval(llm.tokenize(PROMPT))
        assert np.isfinite(logits).all()


def test_attn_scale_sets_the_attention_output_std(tmp_path, small_vocab):
    """--attn-scale 1 turns the routed recipe into the plain one; 0.5 halves attn_output."""
    files = {}
    for label, opts in (("plain", Options(recipe="plain")),
                        ("one", Options(recipe="routed", attn_scale=1.0)),
                        ("half", Options(qtype="F32", attn_scale=0.5)),
                        ("f32", Options(qtype="F32", recipe="plain"))):
        files[label] = tmp_path / f"{label}.gguf"
        synthesize("tiny", files[label], opts, tokenizer=small_vocab)
    with open_gguf(files["plain"]) as a, open_gguf(files["one"]) as b:
        assert all(np.array_equal(a.raw(n), b.raw(n)) for n in a.tensors)
    with open_gguf(files["f32"]) as a, open_gguf(files["half"]) as b:
        for n in a.tensors:
            x, y = a.raw(n).view(np.float32), b.raw(n).view(np.float32)
            assert np.array_equal(y, x * np.float32(0.5) if "attn_output" in n else x), n


def test_options_write_their_keys(tmp_path, small_vocab):
    cases = {"softmax": (Options(gating="softmax", sliding_window=True), 1, 4096),
             "none": (Options(gating="none"), None, None)}
    for label, (opts, gating, window) in cases.items():
        out = tmp_path / f"{label}.gguf"
        synthesize("tiny", out, opts, tokenizer=small_vocab)
        with open_gguf(out) as g:
            assert g.metadata.get("smallthinker.expert_gating_func") == gating
            assert g.metadata.get("smallthinker.attention.sliding_window") == window
            if label == "softmax":  # the runtime reads the 21B layout from the key
                assert load_model(g).args.use_rope == (False, True, True, True)
            else:
                with pytest.warns(UserWarning, match="assuming sigmoid"):
                    assert load_model(g).args.routing.gating == "sigmoid"


def test_weight_types_are_quant_bytes(tmp_path, small_vocab):
    """Same seed, another type: the same draws, quantized by quant.quantize."""
    paths = {}
    for qtype in ("F32", "Q8_0", "Q4_1", "F16"):
        paths[qtype] = tmp_path / f"{qtype}.gguf"
        synthesize("tiny", paths[qtype], Options(qtype=qtype, overrides={"n_layer": 1}),
                   tokenizer=small_vocab)
    with open_gguf(paths["F32"]) as ref:
        q = ref.raw("blk.0.ffn_down_exps.weight").view(np.float32).reshape(8, 256, 128)
        for qtype in ("Q8_0", "Q4_1", "F16"):
            with open_gguf(paths[qtype]) as g:
                t = g.tensors["blk.0.ffn_down_exps.weight"]
                assert t.qtype == qtype and g.metadata["general.file_type"] == \
                    {"Q8_0": 7, "Q4_1": 3, "F16": 1}[qtype]
                assert np.array_equal(g.raw(t.name).ravel(), quant.quantize(qtype, q).ravel())


def test_down_transposed_gives_the_same_logits(tmp_path, small_vocab):
    ids = np.random.default_rng(0).integers(0, 128, 24).tolist()
    logits = {}
    for t in (False, True):
        out = tmp_path / f"down-{t}.gguf"
        synthesize("tiny", out, Options(qtype="F32", down_transposed=t,
                                        overrides={"n_layer": 2}), tokenizer=small_vocab)
        with open_gguf(out) as g:
            assert g.tensors["blk.0.ffn_down_exps.weight"].shape == ((8, 128, 256) if t
                                                                    else (8, 256, 128))
            model = load_model(g)
            logits[t] = prefill(model, model.new_cache(len(ids)), ids, 512, n_logits=None)
    assert np.allclose(logits[True], logits[False], rtol=0, atol=1e-5 * np.abs(logits[False]).max())


def test_bad_requests_are_one_line_errors(tmp_path, capsys, smollm2_path, papers_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a model")
    bad = [
        (["synth", "tiny", str(tmp_path / "no-such-dir" / "x.gguf")], "does not exist"),
        (["synth", "tiny", str(tmp_path / "x.gguf"), "--set", "n_expert_used=9"], "experts"),
        (["synth", "tiny", str(tmp_path / "x.gguf"), "--set", "n_embd=100"], "block size"),
        (["synth", "tiny", str(tmp_path / "x.gguf"), "--type", "Q4_K"], "weight type"),
        (["synth", "tiny", str(tmp_path / "x.gguf"), "--attn-scale", "0"], "positive"),
        (["synth", "tiny", str(tmp_path / "x.gguf"), "--set", "layers=2"], "FIELD"),
        (["synth", "tiny", str(tmp_path / "x.gguf"), "--tokenizer", str(junk)], "not a GGUF"),
        (["synth", "stats", str(tmp_path / "x.gguf")], "x.gguf"),   # before the missing text
        (["synth", "stats", str(smollm2_path), "--text", str(tmp_path / "none.txt")],
         "none.txt"),
        (["synth", "stats", str(smollm2_path), "--text", str(papers_path), "--tokens", "8"],
         "no expert routing"),
    ]
    for argv, words in bad:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("pocketlm: error:") and err.count("\n") == 1 and words in err, err
    assert list(tmp_path.iterdir()) == [junk]


def test_interrupted_write_leaves_no_file(tmp_path, smollm2_path):
    def stop(done, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        synthesize("tiny", tmp_path / "x.gguf", Options(), tokenizer=smollm2_path,
                   progress=stop)
    assert list(tmp_path.iterdir()) == []


def test_routing_stats_match_an_independent_count(tiny):
    with LLM.load(str(tiny), n_ctx=256) as llm:
        ids = llm.tokenize(PROMPT * 3)
        trace = trace_routing(llm, ids)
        # layer 0's router reads the token embedding itself: recompute its choice in float64
        g = llm.gguf
        emb = quant.dequantize("Q4_0", g.raw("token_embd.weight"), g.tensors["token_embd.weight"]
                               .shape)[ids].astype(np.float64)
        router = g.raw("blk.0.ffn_gate_inp.weight").view(np.float32).reshape(8, 256)
        top = np.argsort(-(emb @ router.T.astype(np.float64)), axis=1)[:, :2]
    assert len(trace) == 4 and all(t.shape == (len(ids), 2) for t in trace)
    assert [set(r) for r in trace[0]] == [set(r) for r in top]

    s = routing_stats(trace, 8)
    for sel, lay in zip(trace, s["layers"]):
        counts = Counter(int(e) for row in sel for e in row)
        total = sum(counts.values())
        entropy = -sum(c / total * np.log(c / total) for c in counts.values()) / np.log(8)
        overlap = np.mean([len(set(a) & set(b)) / 2 for a, b in zip(sel[1:], sel[:-1])])
        assert lay["entropy"] == pytest.approx(entropy)
        assert lay["overlap"] == pytest.approx(overlap)
        assert lay["used"] == len(counts) / 8
    assert s["overall"]["overlap"] == pytest.approx(np.mean([x["overlap"] for x in s["layers"]]))
    assert s["chance_overlap"] == 2 / 8 and s["n_tokens"] == len(ids)


def test_routed_recipe_routes_more_diversely_than_plain(tiny, smallthinker_tiny_path,
                                                       papers_path):
    """The plain N(0, 0.02) recipe (the reference model) lets deep layers converge on a few
    experts; the routed recipe keeps routing closer to per-token choice."""
    text = papers_path.read_text()
    stats = {}
    for label, path in (("plain", smallthinker_tiny_path), ("routed", tiny)):
        with LLM.load(str(path), n_ctx=256) as llm:
            stats[label] = routing_stats(trace_routing(llm, llm.tokenize(text)[:128]), 8)
    plain, routed = stats["plain"], stats["routed"]
    assert routed["overall"]["entropy"] > plain["overall"]["entropy"]
    assert routed["layers"][-1]["overlap"] < plain["layers"][-1]["overlap"]


def test_cli_stats(tiny, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(PROMPT * 4)
    assert main(["synth", "stats", str(tiny), "--text", str(text), "--tokens", "40",
                 "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["n_tokens"] == 40 and len(s["layers"]) == 4 and 0 < s["overall"]["entropy"] <= 1
    assert main(["synth", "stats", str(tiny), "--text", str(text), "--tokens", "40"]) == 0
    assert "overlap" in capsys.readouterr().out
