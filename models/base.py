"""What every model file shares: declared configuration and its checks, weights by GGUF name,
cache construction, the output head."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

from pocketlm import nn
from pocketlm.nn.kvcache import KVCache
from pocketlm.quant import QTYPES

# GGUF namespaces that are not prefixed by the architecture name
ABSOLUTE = ("general.", "tokenizer.", "sentence_transformers.")
REQUIRED = object()
MAX_LAYERS = 1 << 12   # per-layer tuples are built from block_count before the tensors are seen
_ABSENT = object()
_CONVERT = {"int": int, "float": float, "bool": bool, "str": str, "tuple": tuple}


@dataclass(frozen=True)
class Key:
    """How one ModelArgs field is read; made by ``key`` and ``derived``."""

    name: str | None     # GGUF key, relative to the architecture unless in ABSOLUTE
    default: Any         # a value, the name of an earlier field, or a callable of the reading
    convert: Callable | None
    min: float | None
    max: float | None


def key(name: str, default: Any = REQUIRED, *, convert: Callable | None = None,
        min: float | None = None, max: float | None = None):
    """A ModelArgs field read from GGUF key ``name`` (``{arch}.name``; ``general.*`` and
    ``tokenizer.*`` as written).

    ``default`` applies when the key is absent: a value; a string naming an earlier field; or a
    callable of the reading so far (earlier fields as attributes, ``.get(key, default)`` for
    other keys). Without one, a missing key is an error. The value is converted by ``convert``,
    else by the field's annotation (int, float, bool, str, tuple); None (an optional key) stays
    None. ``min``, ``max``: the smallest and largest values allowed.
    """
    return field(metadata={"gguf": Key(name, default, convert, min, max)})


def derived(fn: Callable, *, convert: Callable | None = None):
    """A ModelArgs field computed by ``fn(reading)`` from earlier fields and other keys."""
    return field(metadata={"gguf": Key(None, fn, convert, None, None)})


def full_key(arch: str, name: str) -> str:
    """The GGUF key of ``name``: ``{arch}.name`` unless it is in an absolute namespace."""
    return name if name.startswith(ABSOLUTE) else f"{arch}.{name}"


class Reading(SimpleNamespace):
    """The fields read so far, plus ``get`` for keys that are not fields."""

    def __init__(self, meta: dict):
        super().__init__()
        self._meta = meta
        self._arch = meta.get("general.architecture", "")

    def full(self, name: str) -> str:
        """The GGUF key of ``name`` in this file."""
        return full_key(self._arch, name)

    def get(self, name: str, default: Any = REQUIRED):
        """The value of key ``name``; a missing key without default is a one-line error."""
        full = self.full(name)
        if full in self._meta:
            return self._meta[full]
        if default is REQUIRED:
            raise ValueError(f"GGUF metadata lacks {full}")
        return default


@dataclass(frozen=True)
class GGUFArgs:
    """Base of every ``ModelArgs``: fields declared with ``key``/``derived``, read once."""

    arch: str = key("general.architecture", default="")
    # tensor types the architecture computes with (a class attribute, not a field)
    tensor_types = QTYPES

    @classmethod
    def from_gguf(cls, meta: dict):
        """Read every field from GGUF metadata, in declaration order."""
        r = Reading(meta)
        names = {f.name for f in fields(cls)}
        for f in fields(cls):
            spec: Key = f.metadata["gguf"]
            v = r.get(spec.name, _ABSENT) if spec.name else _ABSENT
            if v is _ABSENT:
                d = spec.default
                if d is REQUIRED:
                    r.get(spec.name)   # raises: the key is missing
                if isinstance(d, str) and d in names:
                    v = getattr(r, d)
                else:
                    v = d(r) if callable(d) else d
            if v is not None:
                try:
                    v = (spec.convert or _converter(f.type))(v)
                except (TypeError, OverflowError):   # e.g. an array for a number
                    expect_that(False, r.full(spec.name), _short(v), f"a {f.type} value")
                except ValueError as e:   # a converter's own check, or int("x")
                    raise ValueError(f"GGUF metadata {r.full(spec.name)}: {e}") from None
            if spec.min is not None and v is not None:
                expect_that(v >= spec.min, r.full(spec.name), v, f">= {spec.min}")
            if spec.max is not None and v is not None:
                expect_that(v <= spec.max, r.full(spec.name), v, f"<= {spec.max}")
            setattr(r, f.name, v)
        return cls(**{f.name: getattr(r, f.name) for f in fields(cls)})

    def check(self, w: SimpleNamespace) -> None:
        """Check the weights against these values at load, before any kernel runs (one-line
        ValueErrors); an architecture overrides it with its own checks."""

    def key_name(self, name: str) -> str:
        """The full GGUF key of field key ``name``, for error messages."""
        return full_key(self.arch, name)


@dataclass(frozen=True)
class DecoderArgs(GGUFArgs):
    """The fields every decoder architecture reads alike; its own fields follow (and may
    default to these)."""

    n_embd: int = key("embedding_length", min=1)
    n_layer: int = key("block_count", min=1, max=MAX_LAYERS)
    n_head: int = key("attention.head_count", min=1)
    n_head_kv: int = key("attention.head_count_kv", default="n_head", min=1)
    head_dim: int = key("attention.key_length", default=lambda a: a.n_embd // a.n_head)
    n_vocab: int = key("tokenizer.ggml.tokens", convert=len)


def _converter(annotation) -> Callable:
    """int, float, bool, str or tuple from a field's annotation (a string under postponed
    evaluation); anything else is kept as computed."""
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    return _CONVERT.get(name.split("[")[0], lambda v: v)


def _short(v) -> str:
    s = repr(v).replace("\n", " ")
    return s if len(s) <= 60 else s[:57] + "..."


def expect_that(cond: bool, what: str, value, wanted) -> None:
    """One-line ValueError naming ``what`` (a GGUF key), its value and what was wanted."""
    if not cond:
        raise ValueError(f"GGUF metadata {what} is {value}, expected {wanted}")


def _tensor(w: SimpleNamespace, name: str):
    parts = name.split(".")
    if parts[0] == "blk":
        return getattr(w.blk[int(parts[1])], parts[2], None)
    return getattr(w, parts[0], None)


def expect(w: SimpleNamespace, name: str, *shape: int | None, optional: bool = False) -> None:
    """Tensor ``name`` (GGUF name, e.g. ``blk.0.attn_q``) of ``w`` exists (unless ``optional``)
    and has ``shape`` in numpy order (rows, then columns; None: any); a 1-D tensor (a norm or
    bias) must be F32. Else a one-line ValueError."""
    t = _tensor(w, name)
    if t is None:
        if optional:
            return
        raise ValueError(f"model lacks tensor {name}")
    got = tuple(t.shape)
    want = tuple(g if s is None else s for s, g in zip(shape, got))
    if len(got) != len(shape) or got != want:
        raise ValueError(f"tensor {name} has shape {got}, expected "
                         f"{tuple('any' if s is None else s for s in shape)}")
    if len(shape) == 1 and not isinstance(t, np.ndarray):
        raise ValueError(f"tensor {name} is {t.qtype}, expected F32")


def expect_layers(w: SimpleNamespace, **shapes) -> None:
    """``expect`` for the tensors of every layer, by short name: ``ffn_up=(n_ff, n_embd)``."""
    for i in range(len(w.blk)):
        for name, shape in shapes.items():
            expect(w, f"blk.{i}.{name}", *shape)


def check_decoder(a, w: SimpleNamespace, rope_dims: int, **layer) -> None:
    """The checks every decoder shares: heads, RoPE dimensions, attention, norm and embedding
    shapes against ``a`` (n_embd, n_head, n_head_kv, head_dim, n_vocab); ``layer``: the
    architecture's other per-layer tensors, as for ``expect_layers``."""
    expect_that(a.n_head % a.n_head_kv == 0, a.key_name("attention.head_count_kv"),
                a.n_head_kv, f"a divisor of attention.head_count {a.n_head}")
    expect_that(a.head_dim > 0, a.key_name("attention.key_length"), a.head_dim, "> 0")
    # the rotation pairs dimensions and reads no further than the head
    expect_that(rope_dims % 2 == 0 and 0 < rope_dims <= a.head_dim,
                a.key_name("rope.dimension_count"), rope_dims, f"even and <= {a.head_dim}")
    q, kv, e = a.n_head * a.head_dim, a.n_head_kv * a.head_dim, a.n_embd
    expect(w, "token_embd", a.n_vocab, e)
    expect(w, "output", a.n_vocab, e, optional=True)
    expect(w, "output_norm", e)
    expect_layers(w, attn_norm=(e,), attn_q=(q, e), attn_k=(kv, e), attn_v=(kv, e),
                  attn_output=(e, q), **layer)
    for i in range(len(w.blk)):   # the biases llama.cpp's graphs take where a file has them
        for name, n in (("attn_q_b", q), ("attn_k_b", kv), ("attn_v_b", kv),
                        ("attn_output_b", e)):
            expect(w, f"blk.{i}.{name}", n, optional=True)
    expect(w, "output_b", a.n_vocab, optional=True)


def check_experts(a, w: SimpleNamespace, n_ff: int) -> dict:
    """Expert counts against the router and the stacked expert tensors; returns their shapes
    for ``check_decoder``."""
    expect_that(a.n_expert > 0, a.key_name("expert_count"), a.n_expert, "> 0")
    expect_that(0 < a.n_expert_used <= a.n_expert, a.key_name("expert_used_count"),
                a.n_expert_used, f"in 1..expert_count {a.n_expert}")
    n, e = a.n_expert, a.n_embd
    down = (n, e, n_ff)
    first = _tensor(w, "blk.0.ffn_down_exps") if w.blk else None
    if first is not None and tuple(first.shape) == (n, n_ff, e):
        down = (n, n_ff, e)   # stored like gate/up, as PowerInfer's converter may write it
    return dict(ffn_gate_inp=(n, e), ffn_gate_exps=(n, n_ff, e), ffn_up_exps=(n, n_ff, e),
                ffn_down_exps=down)


def check_tokenizer(meta: dict) -> None:
    """The tokenizer's arrays: strings, numbers of the right kind, one entry per token."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is not None and not (isinstance(tokens, list) and
                                   all(isinstance(t, str) for t in tokens) and tokens):
        raise ValueError("GGUF metadata tokenizer.ggml.tokens is not a non-empty string array")
    for name, kind in (("scores", "f"), ("token_type", "iu")):
        v = meta.get(f"tokenizer.ggml.{name}")
        if v is None:
            continue
        ok = isinstance(v, np.ndarray) and v.dtype.kind in kind and v.ndim == 1
        want = "float" if kind == "f" else "integer"
        expect_that(ok, f"tokenizer.ggml.{name}", getattr(v, "dtype", type(v).__name__),
                    f"an array of {want}s")
        expect_that(tokens is None or len(v) == len(tokens), f"tokenizer.ggml.{name}",
                    f"{len(v)} entries long", f"one per token ({len(tokens or ())})")
    merges = meta.get("tokenizer.ggml.merges")
    if merges is not None and not (isinstance(merges, list) and
                                   all(isinstance(m, str) for m in merges)):
        raise ValueError("GGUF metadata tokenizer.ggml.merges is not a string array")
    for k, v in meta.items():
        if k.startswith("tokenizer.ggml.") and k.endswith("_token_id"):
            expect_that(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and
                        (tokens is None or 0 <= v < len(tokens)), k, v,
                        f"a token id below {len(tokens or ())}")


@dataclass(frozen=True)
class Capabilities:
    """What a model can do, declared by its class: the runtime reads this instead of probing."""

    generate: bool = False          # a decoder: new_cache, forward, configure
    embed: bool = False             # sentence vectors: embed(batch)
    classify: bool = False          # classify_logits(ids) and labels
    moe: bool = False               # routed experts in ``model.experts`` (can stream)
    sparse_attention: bool = False  # configure(sparse_attention=...) changes attention
    devices: tuple[str, ...] = ("cpu",)
    backends: tuple[str, ...] = ("numba",)   # set_backend(name) when more than one
    accounting: bool = False        # paper-style memory figures: activation_values(n)


ROPE_SCALINGS = ("none", "linear", "yarn", "longrope")


def rope_scaling(r: Reading) -> str:
    """``rope.scaling.type``: linear when absent, as llama.cpp reads it."""
    t = r.get("rope.scaling.type", "linear")
    expect_that(t in ROPE_SCALINGS, r.full("rope.scaling.type"), repr(t),
                f"one of {', '.join(ROPE_SCALINGS)}")
    return t


def rope_freq_scale(r: Reading) -> float:
    """RoPE frequency scale as llama.cpp sets it: 1/``rope.scaling.factor`` (or the older
    ``rope.scale_linear``) under every scaling type but none. Needs a ``rope_scaling`` field."""
    factor = r.get("rope.scaling.factor", 0.0) or r.get("rope.scale_linear", 0.0)
    expect_that(isinstance(factor, (int, float, np.number)) and factor >= 0,
                r.full("rope.scaling.factor"), _short(factor), ">= 0")
    return 1.0 / factor if factor and r.rope_scaling != "none" else 1.0


def rope_yarn(r: Reading):
    """The YaRN parameters (``nn.YaRN``) when ``rope.scaling.type`` is yarn, else None. Needs
    the ``rope_scaling``, ``rope_dims``, ``rope_base``, ``rope_freq_scale`` and ``n_ctx_train``
    fields."""
    if r.rope_scaling != "yarn":
        return None
    return nn.yarn(r.rope_dims, r.rope_base, r.rope_freq_scale,
                   r.get("rope.scaling.original_context_length", r.n_ctx_train),
                   rope_attn_factor=r.get("rope.scaling.attn_factor", 1.0))


def check_rope_scaling(a, *supported: str) -> None:
    """The file's ``rope.scaling.type`` (field ``rope_scaling``) is one the architecture's graph
    applies; any other would be ignored, which is silently wrong output."""
    expect_that(a.rope_scaling in supported, a.key_name("rope.scaling.type"), a.rope_scaling,
                " or ".join(supported))


def rope_factors(w: SimpleNamespace, name: str, n_rot: int):
    """Tensor ``name`` (``rope_freqs``, LongRoPE's ``rope_factors_long``/``_short``): one
    frequency divisor per rotated pair, float32 (n_rot/2,); None when the file has none."""
    f = getattr(w, name, None)
    if f is not None and (not isinstance(f, np.ndarray) or f.shape != (n_rot // 2,)):
        raise ValueError(f"tensor {name} must be float32 of shape ({n_rot // 2},)")
    return f


def swa_layers(pattern, n_layer: int, dense_first: bool) -> tuple[bool, ...]:
    """Which layers use sliding-window attention, as llama.cpp's ``set_swa_pattern`` reads
    ``attention.sliding_window_pattern``: an explicit per-layer array, or a period in which one
    layer is dense (the first of each period if ``dense_first``, else the last); 0 = all slide."""
    if not isinstance(pattern, (int, np.integer)):
        return tuple(bool(b) for b in pattern)
    if dense_first:
        return tuple(pattern == 0 or i % pattern != 0 for i in range(n_layer))
    return tuple(pattern == 0 or i % pattern < pattern - 1 for i in range(n_layer))


def load_weights(gguf_file, tensor_types: tuple[str, ...] = QTYPES) -> SimpleNamespace:
    """Tensors by GGUF name: ``w.token_embd``, ``w.blk[i].attn_q`` (``attn_q_b`` for
    ``attn_q.bias``, ``attn_q_scale`` for ``attn_q.scale``) …

    1-D float32 tensors (norms, biases) become float32 arrays; everything else a QTensor whose
    blocks stay memory-mapped.
    """
    top: dict = {}
    blocks: dict[int, dict] = {}
    for name, info in gguf_file.tensors.items():
        parts = name.split(".")
        if parts[-1] == "weight":
            key = parts[-2]
        elif parts[-1] == "bias":
            key = parts[-2] + "_b"
        elif parts[-1] == "scale":  # llama.cpp's name for a weight's scale vector
            key = parts[-2] + "_scale"
        else:
            key = parts[-1]
        if info.qtype not in tensor_types:
            raise ValueError(f"tensor {name} has type {info.qtype}, supported: "
                             f"{', '.join(tensor_types)}")
        if len(info.shape) == 1 and info.qtype == "F32":
            value = gguf_file.raw(name).view(np.float32).reshape(info.shape)
        else:
            value = gguf_file.tensor(name)
        if parts[0] == "blk":
            blocks.setdefault(int(parts[1]), {})[key] = value
        else:
            top[key] = value
    n = len(blocks)
    if sorted(blocks) != list(range(n)):
        raise ValueError(f"{gguf_file.path}: layer tensors are not numbered 0..{n - 1}")
    top["blk"] = [SimpleNamespace(**blocks[i]) for i in range(n)]
    return SimpleNamespace(**top)


class BaseModel:
    """A decoder: ``forward_hidden`` (per model file) then the output head (here), computed
    with ``self.ops`` (``nn.Ops``: CPU kernels by default; ``nn.backend.place`` sets a
    device's)."""

    def __init__(self, args, weights: SimpleNamespace):
        self.args = args
        self.w = weights
        self.ops: nn.Ops = nn.CPU
        # caches keep the float16 copy for decode that the ops want (``Ops.kv_half_copy``)
        # unless a memory budget gives those bytes to expert slots instead
        self.budgeted = False
        if len(weights.blk) != args.n_layer:
            raise ValueError(f"model has {len(weights.blk)} layers, metadata says {args.n_layer}")
        for name in self.required_tensors():
            if not hasattr(weights, name) and not hasattr(weights.blk[0], name):
                raise ValueError(f"model lacks tensor {name}")
        self.output = getattr(weights, "output", None) or weights.token_embd  # tied head
        self.output_b = vars(weights).get("output_b")   # a head bias, where the file has one

    def required_tensors(self) -> tuple[str, ...]:
        return ("token_embd", "output_norm")

    def configure(self, n_ctx: int | None = None, sparse_attention: str = "auto") -> None:
        """Settings that depend on how the model is run (context size, attention mode); most
        decoders have none."""

    def layer_windows(self) -> list[int]:
        """Sliding-window size per layer (0: global attention)."""
        raise NotImplementedError

    def new_cache(self, n_ctx: int, chunk: int = 512) -> KVCache:
        """A KV cache where the model's ops keep it."""
        a = self.args
        half = self.kv_half_copy
        return KVCache([self.ops.layer_cache(a.n_head_kv, a.head_dim, n_ctx, w, chunk, half)
                        for w in self.layer_windows()], n_ctx)

    @property
    def kv_half_copy(self) -> bool:
        """Whether new caches keep a float16 copy of keys and values for decode."""
        return self.ops.kv_half_copy and not self.budgeted

    def forward_hidden(self, ids: np.ndarray, positions: np.ndarray, cache: KVCache,
                       ops: nn.Ops) -> np.ndarray:
        raise NotImplementedError

    def logits(self, hidden: np.ndarray, ops: nn.Ops) -> np.ndarray:
        """(n, n_embd) final hidden states → (n, n_vocab) logits."""
        return ops.linear(self.output, hidden, self.output_b)

    def forward(self, ids: np.ndarray, positions: np.ndarray, cache: KVCache,
                n_logits: int = 1, ops: nn.Ops | None = None) -> np.ndarray | None:
        """Run ``ids`` at ``positions`` through the model, extending ``cache``, on ``ops``
        (default ``self.ops``; prompts run on ``self.ops.prompt``).

        Returns float32 logits (n_logits, n_vocab) of the last ``n_logits`` tokens (None: none).
        """
        ops = ops or self.ops
        h = self.forward_hidden(ids, positions, cache, ops)
        return self.logits(h[len(h) - n_logits:], ops) if n_logits > 0 else None
