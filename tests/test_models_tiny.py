"""Every architecture from tiny random weights against a float64 numpy forward written from its
definition (specs, llama.cpp's graphs): decoders on their logits, with chunked prefill and
cached decode against one-batch evaluation; encoders on hidden states, sentence vectors and
class logits. A new architecture (or layer layout) adds one entry to CASES."""
from __future__ import annotations

import contextlib
import math

import gguf
import numpy as np
import pytest

from pocketlm import nn
from pocketlm.models import load_model
from pocketlm.generate.loop import prefill
from pocketlm.gguf.reader import open_gguf
from pocketlm.tools.synth_embbert import PRESETS, write as write_embbert
# float64 references kept next to their architecture's own tests (tests/ is on sys.path)
from conftest import decode_steps
from test_embbert import inputs as embbert_inputs, ref_forward as embbert_reference
from test_minicpm import Float64MiniCPM

VOCAB = [f"t{i}" for i in range(96)]
EPS = 1e-6
SOFTMAX, SIGMOID = int(gguf.ExpertGatingFuncType.SOFTMAX), int(gguf.ExpertGatingFuncType.SIGMOID)


def _rms(x, w, eps=EPS):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def _rope(x, pos, base, mode, scale=1.0, factors=None, yarn=None):
    """RoPE of x (n, H, D) float64, pairs adjacent ("norm") or half a head apart ("neox").
    Pair i turns by base^(-2i/D) / factors[i] per position, times ``scale`` (linear
    scaling). Under YaRN (``yarn``: factor, original context) the scale is instead a ramp
    from 1/factor (slow pairs) to 1 (fast pairs) between the pairs that turn beta = 32 and 1
    times over the original context, and cos/sin grow by 1 + 0.1 ln(factor)."""
    n, H, D = x.shape
    i = np.arange(D // 2)
    theta = base ** (-2.0 * i / D) / (1.0 if factors is None else factors)   # (D/2,)
    m = 1.0
    if yarn:
        factor, n_ctx_orig = yarn

        def pair(beta):   # the pair that turns beta times over the original context
            return D * np.log(n_ctx_orig / (beta * 2 * np.pi)) / (2 * np.log(base))
        lo, hi = max(0.0, np.floor(pair(32))), min(D - 1.0, np.ceil(pair(1)))
        ramp = 1 - np.clip((i - lo) / max(0.001, hi - lo), 0, 1)
        theta = theta * ((1 - ramp) / factor + ramp)
        m = 1 + 0.1 * np.log(factor)
    else:
        theta = theta * scale
    ang = pos[:, None] * theta[None, :]                          # (n, D/2)
    c, s = (np.cos(ang) * m)[:, None, :], (np.sin(ang) * m)[:, None, :]
    out = x.copy()
    if mode == "norm":
        a, b = x[..., 0::2], x[..., 1::2]
        out[..., 0::2], out[..., 1::2] = a * c - b * s, a * s + b * c
    else:
        a, b = x[..., :D // 2], x[..., D // 2:]
        out[..., :D // 2], out[..., D // 2:] = a * c - b * s, a * s + b * c
    return out


# Decode under the default numerics reads keys and values rounded to float16 (the cache's
# copy for decode, as llama.cpp's cache holds them); the references round them too inside
# ``kv_rounded()``.
_ROUND_KV = [False]


@contextlib.contextmanager
def kv_rounded():
    _ROUND_KV[0] = True
    try:
        yield
    finally:
        _ROUND_KV[0] = False


def _kv(a):
    return a.astype(np.float16).astype(np.float64) if _ROUND_KV[0] else a


def _attn(q, k, v, pos, scale, window):
    k, v = _kv(k), _kv(v)
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


_erf = np.vectorize(math.erf)


def _silu(x):
    return x / (1 + np.exp(-x))


def _relu(x):
    return np.maximum(x, 0)


def _moe(h, p, k, L, act):
    """Top-k experts of gate probabilities p (n, E), weights renormalised over the k."""
    y = np.zeros_like(h)
    for r in range(len(h)):
        top = np.argsort(-p[r])[:k]
        for e, we in zip(top, p[r, top] / p[r, top].sum()):
            g = act(h[r] @ L["ffn_gate_exps.weight"][e].T) * (h[r] @ L["ffn_up_exps.weight"][e].T)
            y[r] += we * (g @ L["ffn_down_exps.weight"][e].T)
    return y


class _Tensors:
    """Adds seeded random tensors to a GGUFWriter and keeps them as float64 (dequantized, as
    the file holds them) for the reference."""

    def __init__(self, writer, qtype, seed):
        self.w, self.gq, self.t = writer, gguf.GGMLQuantizationType[qtype], {}
        self.rng = np.random.default_rng(seed)

    def __call__(self, name, shape, scale=0.1, norm=False, f32=False):
        rng = self.rng
        x = (1.0 + 0.1 * rng.standard_normal(shape) if norm
             else scale * rng.standard_normal(shape)).astype(np.float32)
        # vectors (norms, biases) stay F32, as converters leave them
        if f32 or len(shape) == 1 or self.gq == gguf.GGMLQuantizationType.F32:
            self.w.add_tensor(name, x)
            self.t[name] = x.astype(np.float64)
        else:
            q = gguf.quants.quantize(x, self.gq)
            self.w.add_tensor(name, q, raw_dtype=self.gq)
            self.t[name] = gguf.quants.dequantize(q, self.gq).astype(np.float64)

    def close(self):
        self.w.write_header_to_file()
        self.w.write_kv_data_to_file()
        self.w.write_tensors_to_file()
        self.w.close()


def _layer(t, i):
    return {k[len(f"blk.{i}."):]: v for k, v in t.items() if k.startswith(f"blk.{i}.")}


class Tiny:
    """A tiny decoder: llama, qwen2 (q/k/v biases, NEOX RoPE), gemma3 (``window``: SWA period
    ``pattern``), smallthinker (MoE in every layer; ``swa``: the 21B layout) or minicpm (``mup``
    scales; MoE with ``n_expert``). ``rope``: llama and qwen2's RoPE scaling, as a file
    declares it: {"type": ..., "factor": ..., "orig": original context} (a missing type is
    llama.cpp's linear), or {"freqs": True} for Llama 3's per-pair ``rope_freqs`` tensor."""

    def __init__(self, path, arch, qtype="F32", seed=0, n_layer=3, d=64, H=4, KVH=2, hd=16,
                 ff=96, window=0, pattern=2, n_expert=0, n_used=0, gating=SOFTMAX, swa=False,
                 mup=(12.0, 1.0, 1.0), rope=None):
        self.path, self.arch, self.qtype, self.d, self.H, self.KVH, self.hd = \
            path, arch, qtype, d, H, KVH, hd
        self.n_layer, self.window, self.pattern, self.swa = n_layer, window, pattern, swa
        self.n_used, self.gating = n_used, gating
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
        w.add_layer_norm_rms_eps(EPS)
        self.base = 1e4 if arch in ("llama", "minicpm") else 1e6
        w.add_rope_freq_base(self.base)
        rope = rope or {}
        if "type" in rope:
            w.add_string(f"{arch}.rope.scaling.type", rope["type"])
        if "factor" in rope:
            w.add_rope_scaling_factor(rope["factor"])
        if "orig" in rope:
            w.add_rope_scaling_orig_ctx_len(rope["orig"])
        self.rope_kw = {}
        if rope.get("type") == "yarn":
            self.rope_kw = dict(yarn=(rope["factor"], rope["orig"]))
        elif "factor" in rope:
            self.rope_kw = dict(scale=1 / rope["factor"])
        if arch == "gemma3" and window:
            w.add_sliding_window(window)
            w.add_uint32(f"{arch}.attention.sliding_window_pattern", pattern)
        if swa:
            w.add_sliding_window(4096)
            self.base_swa = 1e4   # SWA layers' own base, read by llama.cpp when present
            w.add_rope_freq_base_swa(self.base_swa)
        if n_expert:
            w.add_expert_count(n_expert)
            w.add_expert_used_count(n_used)
            w.add_expert_feed_forward_length(ff)
            if arch == "smallthinker":
                w.add_expert_gating_func(gguf.ExpertGatingFuncType(gating))
        if arch == "minicpm":
            w.add_embedding_scale(mup[0])
            w.add_residual_scale(mup[1])
            w.add_logit_scale(mup[2])
        w.add_tokenizer_model("gpt2")
        w.add_token_list(VOCAB)
        w.add_token_merges([])
        w.add_token_types([1] * len(VOCAB))
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)
        add = _Tensors(w, qtype, seed)
        add("token_embd.weight", (len(VOCAB), d), 0.5)
        add("output_norm.weight", (d,), norm=True)
        if rope.get("freqs"):   # Llama 3's shape: fast pairs unscaled, slow ones 8x slower
            factors = np.linspace(1.0, 8.0, hd // 2).astype(np.float32)
            w.add_tensor("rope_freqs.weight", factors)
            self.rope_kw = dict(factors=factors.astype(np.float64))
        for i in range(n_layer):
            p = f"blk.{i}."
            add(p + "attn_norm.weight", (d,), norm=True)
            add(p + "attn_q.weight", (H * hd, d))
            add(p + "attn_k.weight", (KVH * hd, d))
            add(p + "attn_v.weight", (KVH * hd, d))
            add(p + "attn_output.weight", (d, H * hd))
            if arch == "qwen2":
                add(p + "attn_q.bias", (H * hd,))
                add(p + "attn_k.bias", (KVH * hd,))
                add(p + "attn_v.bias", (KVH * hd,))
            add(p + "ffn_norm.weight", (d,), norm=True)
            if n_expert:
                add(p + "ffn_gate_inp.weight", (n_expert, d), 0.3, f32=True)
                add(p + "ffn_gate_exps.weight", (n_expert, ff, d))
                add(p + "ffn_up_exps.weight", (n_expert, ff, d))
                add(p + "ffn_down_exps.weight", (n_expert, d, ff))
            else:
                add(p + "ffn_gate.weight", (ff, d))
                add(p + "ffn_up.weight", (ff, d))
                add(p + "ffn_down.weight", (d, ff))
            if arch == "gemma3":
                add(p + "attn_q_norm.weight", (hd,), norm=True)
                add(p + "attn_k_norm.weight", (hd,), norm=True)
                add(p + "post_attention_norm.weight", (d,), norm=True)
                add(p + "post_ffw_norm.weight", (d,), norm=True)
        add.close()
        self.t = add.t

    def reference(self, ids):
        if self.arch == "minicpm":
            return Float64MiniCPM(self.path, 256).logits(np.asarray(ids))
        t, n = self.t, len(ids)
        pos = np.arange(n, dtype=np.float64)
        x = t["token_embd.weight"][ids]
        if self.arch == "gemma3":
            x = x * np.sqrt(self.d)
        for i in range(self.n_layer):
            L = _layer(t, i)
            if self.arch == "smallthinker":   # the router reads the layer input
                z = x @ L["ffn_gate_inp.weight"].T
            h = _rms(x, L["attn_norm.weight"])
            q = (h @ L["attn_q.weight"].T + L.get("attn_q.bias", 0)).reshape(n, self.H, self.hd)
            k = (h @ L["attn_k.weight"].T + L.get("attn_k.bias", 0)).reshape(n, self.KVH, self.hd)
            v = (h @ L["attn_v.weight"].T + L.get("attn_v.bias", 0)).reshape(n, self.KVH, self.hd)
            if self.arch == "gemma3":
                swa = bool(self.window) and i % self.pattern < self.pattern - 1
                base = 1e4 if swa else self.base
                q = _rope(_rms(q, L["attn_q_norm.weight"]), pos, base, "neox")
                k = _rope(_rms(k, L["attn_k_norm.weight"]), pos, base, "neox")
                o = _attn(q / np.sqrt(self.hd), k, v, pos, 1.0, self.window if swa else 0)
                x = x + _rms(o @ L["attn_output.weight"].T, L["post_attention_norm.weight"])
                h = _rms(x, L["ffn_norm.weight"])
                g = _gelu(h @ L["ffn_gate.weight"].T) * (h @ L["ffn_up.weight"].T)
                x = x + _rms(g @ L["ffn_down.weight"].T, L["post_ffw_norm.weight"])
                continue
            # smallthinker's 21B layout (spec §4): layers 0, 4, … global without RoPE, the
            # others RoPE and a 4096-token window
            swa, nope = self.swa and i % 4 != 0, self.swa and i % 4 == 0
            if self.arch in ("llama", "qwen2"):
                mode = "norm" if self.arch == "llama" else "neox"
                q = _rope(q, pos, self.base, mode, **self.rope_kw)
                k = _rope(k, pos, self.base, mode, **self.rope_kw)
            elif not nope:
                base = self.base_swa if swa else self.base
                q, k = _rope(q, pos, base, "neox"), _rope(k, pos, base, "neox")
            o = _attn(q, k, v, pos, 1 / np.sqrt(self.hd), 4096 if swa else 0)
            x = x + o @ L["attn_output.weight"].T
            h = _rms(x, L["ffn_norm.weight"])
            if self.arch == "smallthinker":
                if self.gating == SIGMOID:
                    p = 1 / (1 + np.exp(-z))
                else:
                    p = np.exp(z - z.max(1, keepdims=True))
                    p /= p.sum(1, keepdims=True)
                x = x + _moe(h, p, self.n_used, L, _relu)
            else:
                g = _silu(h @ L["ffn_gate.weight"].T) * (h @ L["ffn_up.weight"].T)
                x = x + g @ L["ffn_down.weight"].T
        return _rms(x, t["output_norm.weight"]) @ t["token_embd.weight"].T

    def check(self, model):
        ids = np.random.default_rng(5).integers(0, len(VOCAB), 11)
        want = self.reference(ids)
        scale = np.abs(want).max()

        # prompts (float activations): one batch and small chunks, float32 rounding of the
        # float64 math
        full = prefill(model, model.new_cache(32, 16), list(ids), chunk=16, n_logits=None)
        chunked = prefill(model, model.new_cache(32, 3), list(ids), chunk=3, n_logits=None)
        rel = np.abs(full - want).max() / scale
        print(f"{self.arch} {self.qtype} prompt: max |Δ| {rel:.1e} of max |logit| {scale:.2f}")
        assert rel < 2e-5
        np.testing.assert_allclose(chunked, full, atol=1e-5 * scale)
        # token-by-token decode: "exact" numerics as close; the default ("llama") keeps
        # float activations for F32 weights and quantizes them to 8 bits for quantized ones
        # as llama.cpp does, which puts logits about a percent of their range from exact math;
        # its attention reads keys and values rounded to float16, as the reference then does
        np.testing.assert_allclose(decode_steps(model, ids, nn.EXACT), full, atol=1e-5 * scale)
        steps = decode_steps(model, ids, nn.CPU)
        with kv_rounded():
            want = self.reference(ids)
        rel = np.abs(steps - want).max() / scale
        print(f"{self.arch} {self.qtype} llama decode: max |Δ| {rel:.1e} of max |logit|")
        assert rel < (2e-4 if self.qtype == "F32" else 3e-2)


def _attn_sinks(q, k, v, pos, scale, window, sinks):
    """``_attn`` with a valueless logit per head in each softmax (gpt-oss)."""
    k, v = _kv(k), _kv(v)
    n, H, D = q.shape
    g = H // k.shape[1]
    out = np.zeros_like(q)
    for h in range(H):
        s = q[:, h] @ k[:, h // g].T * scale
        mask = pos[None, :] <= pos[:, None]
        if window:
            mask &= pos[:, None] - pos[None, :] < window
        s = np.where(mask, s, -np.inf)
        top = np.maximum(s.max(1, keepdims=True), sinks[h])
        w = np.exp(s - top)
        out[:, h] = (w / (w.sum(1, keepdims=True) + np.exp(sinks[h] - top))) @ v[:, h // g]
    return out.reshape(n, -1)


def _swiglu_oai(g, u):
    g, u = np.minimum(g, 7.0), np.clip(u, -7.0, 7.0)
    return g / (1 + np.exp(-1.702 * g)) * (u + 1)


class Float64MoE:
    """The llama-shaped MoE architectures (qwen3moe, qwen2moe, llama with experts, olmoe,
    granitemoe) and gpt-oss from llama.cpp's graphs, in float64 on a file's weights
    (dequantized by gguf-py)."""

    ROPE = {"qwen3moe": "neox", "qwen2moe": "neox", "olmoe": "neox", "llama": "norm",
            "granitemoe": "norm"}
    RENORM = {"qwen3moe": True, "llama": True, "granitemoe": True, "qwen2moe": False,
              "olmoe": False}

    def __init__(self, path):
        r = gguf.GGUFReader(str(path))
        with open_gguf(path) as g:
            meta = dict(g.metadata)
        self.arch = a = meta["general.architecture"]

        def val(key, default=None):
            return meta.get(f"{a}.{key}", default)

        self.t = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
                  .reshape([int(d) for d in reversed(t.shape)]) for t in r.tensors}
        self.L, self.H, self.KVH = (val("block_count"), val("attention.head_count"),
                                    val("attention.head_count_kv"))
        self.hd = val("attention.key_length", val("embedding_length") // self.H)
        self.eps, self.base = val("attention.layer_norm_rms_epsilon"), val("rope.freq_base")
        self.k = val("expert_used_count")
        self.es, self.rs = val("embedding_scale", 0.0) or 1.0, val("residual_scale", 0.0) or 1.0
        self.scale = val("attention.scale", 0.0) or 1 / np.sqrt(self.hd)
        self.ls = val("logit_scale", 1.0)
        self.window = val("attention.sliding_window", 0)
        self.yarn = (val("rope.scaling.factor"), val("rope.scaling.original_context_length"))

    def _gpt_oss_layer(self, x, L, i, pos):
        """gpt-oss: biased q/k/v/o, YaRN, sinks, even layers sliding; router with a bias,
        softmax over the top k logits; biased experts with the clamped SwiGLU."""
        n = len(x)
        h = _rms(x, L["attn_norm.weight"], self.eps)
        q, k, v = ((h @ L[f"attn_{p}.weight"].T + L[f"attn_{p}.bias"]) for p in "qkv")
        q = _rope(q.reshape(n, self.H, self.hd), pos, self.base, "neox", yarn=self.yarn)
        k = _rope(k.reshape(n, self.KVH, self.hd), pos, self.base, "neox", yarn=self.yarn)
        o = _attn_sinks(q, k, v.reshape(n, self.KVH, self.hd), pos, self.scale,
                        self.window if i % 2 == 0 else 0, L["attn_sinks.weight"])
        x = x + o @ L["attn_output.weight"].T + L["attn_output.bias"]
        h = _rms(x, L["post_attention_norm.weight"], self.eps)
        z = h @ L["ffn_gate_inp.weight"].T + L["ffn_gate_inp.bias"]
        y = np.zeros_like(h)
        for r in range(n):
            top = np.argsort(-z[r])[:self.k]
            w = np.exp(z[r, top] - z[r, top].max())
            for e, we in zip(top, w / w.sum()):
                g = h[r] @ L["ffn_gate_exps.weight"][e].T + L["ffn_gate_exps.bias"][e]
                u = h[r] @ L["ffn_up_exps.weight"][e].T + L["ffn_up_exps.bias"][e]
                y[r] += we * (_swiglu_oai(g, u) @ L["ffn_down_exps.weight"][e].T
                              + L["ffn_down_exps.bias"][e])
        return x + y

    def _moe(self, h, L):
        z = h @ L["ffn_gate_inp.weight"].T
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        y = np.zeros_like(h)
        for r in range(len(h)):
            top = np.argsort(-p[r])[:self.k]
            w = p[r, top] / (p[r, top].sum() if self.RENORM[self.arch] else 1.0)
            for e, we in zip(top, w):
                g = _silu(h[r] @ L["ffn_gate_exps.weight"][e].T) * \
                    (h[r] @ L["ffn_up_exps.weight"][e].T)
                y[r] += we * (g @ L["ffn_down_exps.weight"][e].T)
        if "ffn_up_shexp.weight" in L:
            g = _silu(h @ L["ffn_gate_shexp.weight"].T) * (h @ L["ffn_up_shexp.weight"].T)
            gate = 1 / (1 + np.exp(-(h @ L["ffn_gate_inp_shexp.weight"])))
            y += gate[:, None] * (g @ L["ffn_down_shexp.weight"].T)
        return y

    def logits(self, ids):
        t, n, eps = self.t, len(ids), self.eps
        pos = np.arange(n, dtype=np.float64)
        x = t["token_embd.weight"][ids] * self.es
        for i in range(self.L):
            L = _layer(t, i)
            if self.arch == "gpt-oss":
                x = self._gpt_oss_layer(x, L, i, pos)
                continue
            h = _rms(x, L["attn_norm.weight"], eps)
            q = h @ L["attn_q.weight"].T + L.get("attn_q.bias", 0)
            k = h @ L["attn_k.weight"].T + L.get("attn_k.bias", 0)
            v = (h @ L["attn_v.weight"].T + L.get("attn_v.bias", 0)).reshape(n, self.KVH, -1)
            if self.arch == "olmoe":   # over the full width, before the heads are split
                q, k = _rms(q, L["attn_q_norm.weight"], eps), _rms(k, L["attn_k_norm.weight"], eps)
            q, k = q.reshape(n, self.H, self.hd), k.reshape(n, self.KVH, self.hd)
            if self.arch == "qwen3moe":   # per head
                q, k = _rms(q, L["attn_q_norm.weight"], eps), _rms(k, L["attn_k_norm.weight"], eps)
            mode = self.ROPE[self.arch]
            q, k = _rope(q, pos, self.base, mode), _rope(k, pos, self.base, mode)
            x = x + self.rs * (_attn(q, k, v, pos, self.scale, 0) @ L["attn_output.weight"].T)
            x = x + self.rs * self._moe(_rms(x, L["ffn_norm.weight"], eps), L)
        out = t.get("output.weight", t["token_embd.weight"])
        return _rms(x, t["output_norm.weight"], eps) @ out.T / self.ls


class TinySynthMoE(Tiny):
    """A llama-shaped MoE model written by ``pocketlm synth`` (its ``-tiny`` preset, weights
    ``qtype``) against ``Float64MoE``."""

    def __init__(self, path, preset, qtype="F32", std=0.1):
        from pocketlm.tools import synth_minicpm
        from pocketlm.tools.synth import Options, presets, synthesize
        vocab = synth_minicpm.vocab_gguf(path.with_name("vocab.gguf"))
        synthesize(preset, path, Options(seed=3, qtype=qtype, recipe="plain",
                                         overrides=dict(std=std)), vocab)
        self.arch, self.qtype = presets()[preset].ARCH, qtype
        self.exact = Float64MoE(path)

    def reference(self, ids):
        return self.exact.logits(np.asarray(ids))


class TinyBert:
    """A tiny BERT sentence encoder (mean pooling) from its definition: embeddings + LayerNorm,
    post-norm layers with bidirectional attention and an erf-GELU FFN."""

    def __init__(self, path, seed=0, n_layer=2, d=64, H=4, ff=128, n_ctx=32):
        self.n_layer, self.d, self.H, self.n_ctx, self.eps = n_layer, d, H, n_ctx, 1e-12
        w = gguf.GGUFWriter(str(path), "bert")
        w.add_context_length(n_ctx)
        w.add_embedding_length(d)
        w.add_block_count(n_layer)
        w.add_feed_forward_length(ff)
        w.add_head_count(H)
        w.add_layer_norm_eps(self.eps)
        w.add_causal_attention(False)
        w.add_pooling_type(gguf.PoolingType.MEAN)
        w.add_tokenizer_model("bert")
        w.add_token_list(VOCAB)
        add = _Tensors(w, "F32", seed)
        add("token_embd.weight", (len(VOCAB), d), 0.5)
        add("position_embd.weight", (n_ctx, d), 0.5)
        add("token_types.weight", (2, d), 0.5)
        add("token_embd_norm.weight", (d,), norm=True)
        add("token_embd_norm.bias", (d,))
        for i in range(n_layer):
            p = f"blk.{i}."
            for name, rows, cols in (("attn_q", d, d), ("attn_k", d, d), ("attn_v", d, d),
                                     ("attn_output", d, d), ("ffn_up", ff, d),
                                     ("ffn_down", d, ff)):
                add(p + name + ".weight", (rows, cols), 1 / np.sqrt(cols))
                add(p + name + ".bias", (rows,))
            for name in ("attn_output_norm", "layer_output_norm"):
                add(p + name + ".weight", (d,), norm=True)
                add(p + name + ".bias", (d,))
        add.close()
        self.t = add.t

    def reference(self, ids):
        """Last-layer states (T, d) and the unit mean-pooled vector of one unpadded sequence."""
        t, T, H = self.t, len(ids), self.H
        D = self.d // H

        def ln(x, n):
            return _ln(x, t[n + ".weight"], t[n + ".bias"], self.eps)

        def lin(x, n):
            return x @ t[n + ".weight"].T + t[n + ".bias"]

        x = ln(t["token_embd.weight"][ids] + t["position_embd.weight"][:T]
               + t["token_types.weight"][0], "token_embd_norm")
        for i in range(self.n_layer):
            p = f"blk.{i}."
            q, k, v = (lin(x, p + n).reshape(T, H, D) for n in ("attn_q", "attn_k", "attn_v"))
            s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(D)
            a = np.exp(s - s.max(-1, keepdims=True))
            o = np.einsum("hqk,khd->qhd", a / a.sum(-1, keepdims=True), v).reshape(T, -1)
            x = ln(x + lin(o, p + "attn_output"), p + "attn_output_norm")
            f = lin(x, p + "ffn_up")
            x = ln(x + lin(0.5 * f * (1 + _erf(f / np.sqrt(2))), p + "ffn_down"),
                   p + "layer_output_norm")
        v = x.mean(0)
        return x, v / np.linalg.norm(v)

    def check(self, model):
        rng = np.random.default_rng(5)
        batch = [rng.integers(0, len(VOCAB), n).tolist() for n in (9, 1, self.n_ctx, 20)]
        lengths = np.array([len(s) for s in batch])
        padded = np.zeros((len(batch), lengths.max()), np.int64)
        for b, s in enumerate(batch):
            padded[b, :len(s)] = s
        want = [self.reference(s) for s in batch]
        for backend in ("numba", "numpy"):
            model.set_backend(backend)
            if backend == "numba":   # float activations also for one-token sequences
                model.ops = nn.EXACT
            # a padded, masked batch against each sequence on its own
            hidden, vectors = model.hidden(padded, lengths), model.embed(batch)
            dh = max(np.abs(hidden[b, :n] - w[0]).max() for b, (n, w) in
                     enumerate(zip(lengths, want)))
            dv = np.abs(vectors - np.stack([w[1] for w in want])).max()
            print(f"bert {backend}: max |Δ| hidden {dh:.1e}, unit vectors {dv:.1e}")
            assert dh < 2e-5 and dv < 1e-5


class TinyEmbBert:
    """EmbBERT-Q from random weights in the authors' layout, written by the converter."""

    def __init__(self, path, seed=0):
        self.state = write_embbert(path, "embbert-test", "f32", seed=seed, n_labels=5)

    def check(self, model):
        c = PRESETS["embbert-test"]
        d = 0.0
        for ids in embbert_inputs(c["vocab"], c["ctx"], np.random.default_rng(5)):
            want = embbert_reference(self.state, ids)
            got = model.classify_logits(ids)
            d = max(d, np.abs(got - want).max() / np.abs(want).max())
        print(f"embbert: max |Δ| {d:.1e} of max |logit|")
        assert d < 1e-5


CASES = {
    "llama": (Tiny, dict(arch="llama")),
    "llama-Q8_0": (Tiny, dict(arch="llama", qtype="Q8_0")),
    "qwen2": (Tiny, dict(arch="qwen2")),
    # RoPE scaling as files declare it: a factor with no type acts linearly (llama.cpp's
    # default type), Llama 3's per-pair factors, YaRN past an original context of 64
    "llama-linear": (Tiny, dict(arch="llama", rope=dict(factor=4.0))),
    "llama-rope-freqs": (Tiny, dict(arch="llama", rope=dict(freqs=True))),
    "qwen2-yarn": (Tiny, dict(arch="qwen2", rope=dict(type="yarn", factor=4.0, orig=64))),
    "qwen2-Q8_0": (Tiny, dict(arch="qwen2", qtype="Q8_0")),
    "gemma3": (Tiny, dict(arch="gemma3")),
    "gemma3-swa": (Tiny, dict(arch="gemma3", window=4)),
    "gemma3-swa-Q4_0": (Tiny, dict(arch="gemma3", qtype="Q4_0", window=4)),
    "smallthinker": (Tiny, dict(arch="smallthinker", n_expert=8, n_used=2, ff=64)),
    # layers 0 and 4 global NoPE, sigmoid gating as the released models
    "smallthinker-swa": (Tiny, dict(arch="smallthinker", n_layer=5, n_expert=8, n_used=4,
                                    ff=64, gating=SIGMOID, swa=True)),
    "smallthinker-swa-Q8_0": (Tiny, dict(arch="smallthinker", qtype="Q8_0", n_layer=5,
                                         n_expert=8, n_used=4, ff=64, gating=SIGMOID,
                                         swa=True)),
    # muP scales away from llama.cpp's defaults; the logit scale is n_embd / 256
    "minicpm": (Tiny, dict(arch="minicpm", mup=(6.0, 0.5, 0.25))),
    "minicpm-moe": (Tiny, dict(arch="minicpm", mup=(6.0, 0.5, 0.25), n_expert=8, n_used=2,
                               ff=64)),
    "minicpm-Q4_0": (Tiny, dict(arch="minicpm", qtype="Q4_0", mup=(6.0, 0.5, 0.25))),
    # llama-shaped MoE models as pocketlm synth writes them; std 0.1 so routing matters
    **{p: (TinySynthMoE, dict(preset=f"{p}-tiny")) for p in
       ("qwen3moe", "qwen2moe", "mixtral", "olmoe", "granitemoe")},
    "qwen3moe-Q8_0": (TinySynthMoE, dict(preset="qwen3moe-tiny", qtype="Q8_0")),
    # experts MXFP4 whatever the type of the other weights; no q/k norms, so a smaller
    # init, as for Mixtral in tools.moe_reference (at 0.1 one expert choice is a near tie
    # that 8-bit activations flip)
    "gpt-oss-Q8_0": (TinySynthMoE, dict(preset="gpt-oss-tiny", qtype="Q8_0", std=0.07)),
    "bert": (TinyBert, {}),
    "embbert": (TinyEmbBert, {}),
}


@pytest.mark.parametrize("case", CASES)
def test_tiny_model_matches_reference(tmp_path, case):
    """Exact numerics (float activations) within float32 rounding of the float64 forward;
    decoders also under the default numerics (8-bit activations for quantized weights)."""
    make, kwargs = CASES[case]
    tiny = make(tmp_path / "m.gguf", **kwargs)
    with open_gguf(tmp_path / "m.gguf") as g:
        tiny.check(load_model(g))


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
