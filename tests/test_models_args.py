"""Declared model configuration: how ``key`` fields are read, and the one-line errors of the
checks at load when one metadata value of a tiny model is edited."""
from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import pytest

from pocketlm.gguf.reader import open_gguf
from pocketlm.models import llama, load_model
from pocketlm.models.base import GGUFArgs, derived, key, load_weights

D, H, KVH, HD, N_VOCAB = 64, 4, 2, 16, 32


def _write(path, arch="llama", drop=(), **meta):
    """A two-layer decoder with F32 weights of the shapes its metadata implies; ``meta``
    overrides or adds ``{arch}.<key>`` values (dots written as ``__``), ``drop`` omits keys."""
    values = {"context_length": 128, "embedding_length": D, "block_count": 2,
              "feed_forward_length": 96, "attention.head_count": H,
              "attention.head_count_kv": KVH, "attention.key_length": HD,
              "rope.dimension_count": HD, "attention.layer_norm_rms_epsilon": 1e-6}
    if arch == "smallthinker":
        values |= {"expert_count": 4, "expert_used_count": 2, "expert_gating_func": 2}
    if arch == "minicpm":
        values["logit_scale"] = 1.0
    values |= {k.replace("__", "."): v for k, v in meta.items()}
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in values.items():
        if k in drop:
            continue
        if isinstance(v, str):
            w.add_string(f"{arch}.{k}", v)
        elif isinstance(v, float):
            w.add_float32(f"{arch}.{k}", v)
        else:
            w.add_uint32(f"{arch}.{k}", v)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(N_VOCAB)])
    rng = np.random.default_rng(0)

    def t(name, *shape):
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    t("token_embd.weight", N_VOCAB, D)
    t("output_norm.weight", D)
    for i in range(2):
        t(f"blk.{i}.attn_norm.weight", D)
        t(f"blk.{i}.attn_q.weight", H * HD, D)
        t(f"blk.{i}.attn_k.weight", KVH * HD, D)
        t(f"blk.{i}.attn_v.weight", KVH * HD, D)
        t(f"blk.{i}.attn_output.weight", D, H * HD)
        t(f"blk.{i}.ffn_norm.weight", D)
        t(f"blk.{i}.ffn_gate.weight", 96, D)
        t(f"blk.{i}.ffn_up.weight", 96, D)
        t(f"blk.{i}.ffn_down.weight", D, 96)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _load_error(path) -> str:
    with open_gguf(path) as g, pytest.raises(ValueError) as e:
        load_model(g)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ")   # one line naming the file
    return msg[len(f"{path}: "):]


def test_unedited_tiny_model_loads(tmp_path):
    with open_gguf(_write(tmp_path / "m.gguf")) as g:
        a = load_model(g).args
    assert (a.n_embd, a.n_head, a.n_head_kv, a.head_dim, a.rope_dims, a.n_vocab) == \
        (D, H, KVH, HD, HD, N_VOCAB)


@pytest.mark.parametrize("arch", ["llama", "minicpm", "smallthinker", "gemma3"])
def test_attention_shapes_against_metadata(tmp_path, arch):
    # metadata claims 8-wide heads; the tensors are 16 wide
    msg = _load_error(_write(tmp_path / "m.gguf", arch, attention__key_length=8,
                             rope__dimension_count=8))
    assert msg == f"tensor blk.0.attn_q has shape ({H * HD}, {D}), expected ({H * 8}, {D})"


@pytest.mark.parametrize("arch", ["llama", "minicpm", "smallthinker", "gemma3"])
def test_head_counts(tmp_path, arch):
    assert _load_error(_write(tmp_path / "a.gguf", arch, attention__head_count=0)) == \
        f"GGUF metadata {arch}.attention.head_count is 0, expected >= 1"
    assert _load_error(_write(tmp_path / "b.gguf", arch, attention__head_count_kv=3)) == \
        f"GGUF metadata {arch}.attention.head_count_kv is 3, expected a divisor of " \
        f"attention.head_count {H}"


def test_rope_dimensions(tmp_path):
    assert _load_error(_write(tmp_path / "a.gguf", rope__dimension_count=128)) == \
        f"GGUF metadata llama.rope.dimension_count is 128, expected even and <= {HD}"
    assert _load_error(_write(tmp_path / "b.gguf", rope__dimension_count=7)) == \
        f"GGUF metadata llama.rope.dimension_count is 7, expected even and <= {HD}"
    # MiniCPM rotates whole heads only
    assert _load_error(_write(tmp_path / "c.gguf", "minicpm", rope__dimension_count=8)) == \
        f"GGUF metadata minicpm.rope.dimension_count is 8, expected the head size {HD}"


def test_rope_scaling(tmp_path):
    """A scaling type the architecture's graph does not apply is refused at load, never
    ignored; a factor with no type scales linearly, as llama.cpp reads it."""
    assert _load_error(_write(tmp_path / "a.gguf", rope__scaling__type="dynamic")) == \
        "GGUF metadata llama.rope.scaling.type is 'dynamic', expected one of none, linear, " \
        "yarn, longrope"
    assert _load_error(_write(tmp_path / "b.gguf", rope__scaling__type="longrope")) == \
        "GGUF metadata llama.rope.scaling.type is longrope, expected none or linear or yarn"
    for arch in ("gemma3", "smallthinker"):
        assert _load_error(_write(tmp_path / f"{arch}.gguf", arch,
                                  rope__scaling__type="yarn")) == \
            f"GGUF metadata {arch}.rope.scaling.type is yarn, expected none or linear"
    assert _load_error(_write(tmp_path / "c.gguf", "minicpm", rope__scaling__type="yarn")) == \
        "GGUF metadata minicpm.rope.scaling.type is yarn, expected none or linear or longrope"
    assert _load_error(_write(tmp_path / "d.gguf", rope__scaling__factor=-2.0)) == \
        "GGUF metadata llama.rope.scaling.factor is -2.0, expected >= 0"
    scales = {}
    for name, meta in {"default": {}, "none": dict(rope__scaling__type="none")}.items():
        with open_gguf(_write(tmp_path / f"{name}.gguf", rope__scaling__factor=4.0,
                              **meta)) as g:
            scales[name] = load_model(g).args.rope_freq_scale
    assert scales == {"default": 0.25, "none": 1.0}
    # the CUDA path has no YaRN kernel: placing such a model there is refused before upload
    from pocketlm.nn.backend import place
    with open_gguf(_write(tmp_path / "y.gguf", rope__scaling__type="yarn",
                          rope__scaling__factor=4.0)) as g:
        m = load_model(g)
        assert m.args.yarn is not None and m.capabilities.devices == ("cpu",)
        with pytest.raises(ValueError, match="no CUDA path"):
            place(m, "cuda")


def test_gating_function(tmp_path):
    assert _load_error(_write(tmp_path / "a.gguf", "smallthinker", expert_gating_func=3)) == \
        "GGUF metadata smallthinker.expert_gating_func is 3, expected 1 (softmax) or 2 (sigmoid)"


def test_vocabulary_and_missing_key(tmp_path):
    # one embedding row per token: a vocabulary of 32 does not fit a 40-token list
    p = _write(tmp_path / "a.gguf")
    with open_gguf(p) as g:
        w = {**g.metadata, "tokenizer.ggml.tokens": [f"t{i}" for i in range(40)]}
        with pytest.raises(ValueError, match=fr"^tensor token_embd has shape \({N_VOCAB}, "
                                             fr"{D}\), expected \(40, {D}\)$"):
            llama.ModelArgs.from_gguf(w).check(load_weights(g))
    assert _load_error(_write(tmp_path / "b.gguf", drop=("block_count",))) == \
        "GGUF metadata lacks llama.block_count"


@dataclass(frozen=True)
class _Args(GGUFArgs):
    n_embd: int = key("embedding_length")
    n_head: int = key("attention.head_count")
    n_head_kv: int = key("attention.head_count_kv", default="n_head")
    head_dim: int = key("attention.key_length", default=lambda a: a.n_embd // a.n_head)
    scale: float = key("scale", default=1)
    gated: bool = key("gated", default=0)
    kind: str = key("kind", default="none")        # a string that names no field is a value
    pattern: tuple[bool, ...] = key("pattern", default=(True, False))
    optional: int = key("optional", default=None)
    n_vocab: int = key("tokenizer.ggml.tokens", convert=len)
    twice: int = derived(lambda a: 2 * a.get("twice_of", a.head_dim))


def test_key_declarations():
    meta = {"general.architecture": "toy", "toy.embedding_length": 64,
            "toy.attention.head_count": 8, "tokenizer.ggml.tokens": ["a", "b", "c"],
            # an unprefixed key is not the architecture's
            "embedding_length": 1}
    a = _Args.from_gguf(meta)
    assert (a.arch, a.n_embd, a.n_head, a.n_head_kv, a.head_dim, a.n_vocab, a.twice) == \
        ("toy", 64, 8, 8, 8, 3, 16)
    assert (a.scale, a.gated, a.kind, a.pattern, a.optional) == (1.0, False, "none",
                                                               (True, False), None)
    assert type(a.scale) is float and type(a.gated) is bool
    b = _Args.from_gguf({**meta, "toy.attention.head_count_kv": 2, "toy.attention.key_length": 4,
                         "toy.pattern": np.array([False, True, True]), "toy.optional": 5,
                         "toy.twice_of": 10})
    assert (b.n_head_kv, b.head_dim, b.pattern, b.optional, b.twice) == \
        (2, 4, (False, True, True), 5, 20)
    with pytest.raises(ValueError, match="^GGUF metadata lacks toy.attention.head_count$"):
        _Args.from_gguf({k: v for k, v in meta.items() if k != "toy.attention.head_count"})
