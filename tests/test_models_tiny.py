"""Every architecture from tiny random weights: the runtime vs a float64 numpy forward written
from the architecture's definition, and cached decode vs one-batch evaluation."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from pocketlm.models import load_model
from pocketlm.generate.loop import prefill
from pocketlm.gguf.reader import open_gguf

VOCAB = [f"t{i}" for i in range(96)]


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x, pos, base, mode):
    # x (n, H, D) float64
    n, H, D = x.shape
    inv = base ** (-np.arange(0, D, 2) / D)                     # (D/2,)
    ang = pos[:, None] * inv[None, :]                           # (n, D/2)
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    out = x.copy()
    if mode == "norm":
        a, b = x[..., 0::2], x[..., 1::2]
        out[..., 0::2], out[..., 1::2] = a * c - b * s, a * s + b * c
    else:
        a, b = x[..., :D // 2], x[..., D // 2:]
        out[..., :D // 2], out[..., D // 2:] = a * c - b * s, a * s + b * c
    return out


def _attn(q, k, v, pos, scale, window):
    n, H, D = q.shape
    g = H // k.shape[1]
    out = np.zeros_like(q)
    for h in range(H):
        s = q[:, h] @ k[:, h // g].T * scale                      # (n, n)
        mask = pos[None, :] <= pos[:, None]
        if window:
            mask &= pos[:, None] - pos[None, :] < window
        s = np.where(mask, s, -np.inf)
        w = np.exp(s - s.max(1, keepdims=True))
        out[:, h] = (w / w.sum(1, keepdims=True)) @ v[:, h // g]
    return out.reshape(n, -1)


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


class Tiny:
    """Random weights for a tiny model, written as GGUF and kept as float64 for the reference."""

    def __init__(self, arch, path, qtype="F32", seed=0, n_layer=3, d=64, H=4, KVH=2, hd=16,
                 ff=96, window=0, pattern=2):
        self.arch, self.d, self.H, self.KVH, self.hd = arch, d, H, KVH, hd
        self.n_layer, self.window, self.pattern = n_layer, window, pattern
        rng = np.random.default_rng(seed)
        w = gguf.GGUFWriter(str(path), arch)
        w.add_context_length(256)
        w.add_embedding_length(d)
        w.add_block_count(n_layer)
        w.add_feed_forward_length(ff)
        w.add_head_count(H)
        w.add_head_count_kv(KVH)
        w.add_key_length(hd)
        w.add_value_length(hd)
        w.add_rope_dimension_count(hd)
        w.add_layer_norm_rms_eps(1e-6)
        self.base = 10000.0 if arch == "llama" else 1e6
        w.add_rope_freq_base(self.base)
        if arch == "gemma3" and window:
            w.add_sliding_window(window)
            w.add_uint32(f"{arch}.attention.sliding_window_pattern", pattern)
        w.add_tokenizer_model("gpt2")
        w.add_token_list(VOCAB)
        w.add_token_merges([])
        w.add_token_types([1] * len(VOCAB))
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)
        self.t = {}
        gq = gguf.GGMLQuantizationType[qtype]

        def add(name, shape, scale=0.1, norm=False):
            x = (1.0 + 0.1 * rng.standard_normal(shape) if norm
                 else scale * rng.standard_normal(shape)).astype(np.float32)
            if norm or qtype == "F32":
                w.add_tensor(name, x)
                self.t[name] = x.astype(np.float64)
            else:
                q = gguf.quants.quantize(x, gq)
                w.add_tensor(name, q, raw_dtype=gq)
                self.t[name] = gguf.quants.dequantize(q, gq).astype(np.float64)

        add("token_embd.weight", (len(VOCAB), d), 0.5)
        add("output_norm.weight", (d,), norm=True)
        for i in range(n_layer):
            p = f"blk.{i}."
            add(p + "attn_norm.weight", (d,), norm=True)
            add(p + "attn_q.weight", (H * hd, d))
            add(p + "attn_k.weight", (KVH * hd, d))
            add(p + "attn_v.weight", (KVH * hd, d))
            add(p + "attn_output.weight", (d, H * hd))
            add(p + "ffn_norm.weight", (d,), norm=True)
            add(p + "ffn_gate.weight", (ff, d))
            add(p + "ffn_up.weight", (ff, d))
            add(p + "ffn_down.weight", (d, ff))
            if arch == "gemma3":
                add(p + "attn_q_norm.weight", (hd,), norm=True)
                add(p + "attn_k_norm.weight", (hd,), norm=True)
                add(p + "post_attention_norm.weight", (d,), norm=True)
                add(p + "post_ffw_norm.weight", (d,), norm=True)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    def reference(self, ids):
        t, eps = self.t, 1e-6
        n = len(ids)
        pos = np.arange(n, dtype=np.float64)
        x = t["token_embd.weight"][ids]
        if self.arch == "gemma3":
            x = x * np.sqrt(self.d)
        for i in range(self.n_layer):
            L = {k[len(f"blk.{i}."):]: v for k, v in t.items() if k.startswith(f"blk.{i}.")}
            h = _rms(x, L["attn_norm.weight"], eps)
            q = (h @ L["attn_q.weight"].T).reshape(n, self.H, self.hd)
            k = (h @ L["attn_k.weight"].T).reshape(n, self.KVH, self.hd)
            v = (h @ L["attn_v.weight"].T).reshape(n, self.KVH, self.hd)
            if self.arch == "llama":
                q, k = _rope(q, pos, self.base, "norm"), _rope(k, pos, self.base, "norm")
                o = _attn(q, k, v, pos, 1 / np.sqrt(self.hd), 0)
                x = x + o @ L["attn_output.weight"].T
                h = _rms(x, L["ffn_norm.weight"], eps)
                g = h @ L["ffn_gate.weight"].T
                f = (g / (1 + np.exp(-g)) * (h @ L["ffn_up.weight"].T)) @ L["ffn_down.weight"].T
                x = x + f
            else:
                swa = bool(self.window) and i % self.pattern < self.pattern - 1
                base = 1e4 if swa else self.base
                q = _rope(_rms(q, L["attn_q_norm.weight"], eps), pos, base, "neox")
                k = _rope(_rms(k, L["attn_k_norm.weight"], eps), pos, base, "neox")
                o = _attn(q / np.sqrt(self.hd), k, v, pos, 1.0, self.window if swa else 0)
                x = x + _rms(o @ L["attn_output.weight"].T, L["post_attention_norm.weight"], eps)
                h = _rms(x, L["ffn_norm.weight"], eps)
                g = _gelu(h @ L["ffn_gate.weight"].T) * (h @ L["ffn_up.weight"].T)
                x = x + _rms(g @ L["ffn_down.weight"].T, L["post_ffw_norm.weight"], eps)
        x = _rms(x, t["output_norm.weight"], eps)
        return x @ t["token_embd.weight"].T


CASES = [("llama", "F32", 0), ("llama", "Q8_0", 0), ("gemma3", "F32", 0), ("gemma3", "F32", 4),
         ("gemma3", "Q4_0", 4)]


@pytest.mark.parametrize("arch,qtype,window", CASES)
def test_tiny_model_matches_reference(tmp_path, arch, qtype, window):
    tiny = Tiny(arch, tmp_path / "m.gguf", qtype, window=window)
    ids = np.random.default_rng(5).integers(0, len(VOCAB), 11)
    with open_gguf(tmp_path / "m.gguf") as g:
        model = load_model(g)
        want = tiny.reference(ids)
        # one batch, small prefill chunks, and token-by-token decode must all agree
        full = prefill(model, model.new_cache(32, 16), list(ids), chunk=16, n_logits=None)
        chunked = prefill(model, model.new_cache(32, 3), list(ids), chunk=3, n_logits=None)
        cache = model.new_cache(32, 1)
        steps = np.concatenate([prefill(model, cache, [int(t)], chunk=1) for t in ids])
    scale = np.abs(want).max()
    # F32 weights run float32 activations; quantized weights quantize activations to 8 bits
    tol = 2e-4 if qtype == "F32" else 3e-2
    assert np.abs(full - want).max() / scale < tol
    # chunks under 8 tokens take the 8-bit-activation path for quantized weights
    same = 1e-4 if qtype == "F32" else tol
    np.testing.assert_allclose(chunked, full, atol=same * scale)
    np.testing.assert_allclose(steps, full, atol=same * scale)


def test_layer_layouts_follow_llama_cpp():
    """Layer schedules from the specs: SmallThinker-21B (SWA key present) has global NoPE
    layers 0, 4, …, 48; Gemma 3 (period 6) has global layers 5, 11, 17 of 18."""
    from pocketlm.models import gemma3, smallthinker
    base = {"general.architecture": "smallthinker", "tokenizer.ggml.tokens": VOCAB,
            "smallthinker.block_count": 52, "smallthinker.embedding_length": 2560,
            "smallthinker.attention.head_count": 28, "smallthinker.attention.key_length": 128,
            "smallthinker.expert_count": 64, "smallthinker.expert_used_count": 6,
            "smallthinker.expert_gating_func": 2}
    a = smallthinker.ModelArgs.from_gguf({**base, "smallthinker.attention.sliding_window": 4096})
    assert [i for i, s in enumerate(a.is_swa) if not s] == list(range(0, 52, 4))
    assert [i for i, r in enumerate(a.use_rope) if not r] == list(range(0, 52, 4))
    b = smallthinker.ModelArgs.from_gguf(base)
    assert not any(b.is_swa) and all(b.use_rope)
    g = gemma3.ModelArgs.from_gguf({
        "general.architecture": "gemma3", "tokenizer.ggml.tokens": VOCAB,
        "gemma3.block_count": 18, "gemma3.embedding_length": 640, "gemma3.feed_forward_length": 2048,
        "gemma3.attention.head_count": 4, "gemma3.attention.key_length": 256,
        "gemma3.attention.sliding_window": 512})
    assert [i for i, s in enumerate(g.is_swa) if not s] == [5, 11, 17]
