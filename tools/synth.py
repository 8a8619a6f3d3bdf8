"""Synthetic GGUF models: random weights at real shapes, streamed to disk tensor by tensor.

``synthesize(preset, out, options)`` writes a GGUF whose metadata uses the keys llama.cpp's
converter writes for the architecture, whose tokenizer (every ``tokenizer.*`` key, byte for
byte) is copied from another GGUF, and whose weights are drawn from one
``numpy.random.default_rng(seed)`` stream in file order and quantized with ``quant.quantize``
(byte-exact with llama.cpp). Only one slab (an expert plane, or a few MiB of rows) is in memory
at a time, so a multi-GB model needs little RAM. The same inputs give the same bytes.

``model_routing(model, text)`` measures how an MoE model routes a real text: expert-usage
entropy, consecutive-token overlap of the chosen expert sets and the share of experts used.

Plugging in an architecture
---------------------------
An architecture is a module listed in ``ARCH_MODULES`` that defines

* ``ARCH``: its ``general.architecture`` string;
* ``PRESETS``: ``{preset name: shape dict}`` (preset names are global, so they must not clash
  with another architecture's);
* ``build(shape, options, n_vocab) -> SynthModel``: ``shape`` is the preset's dict,
  ``options`` an ``Options`` (raise ``ValueError`` for an option the architecture cannot honour),
  ``n_vocab`` the size of the copied vocabulary.

``SynthModel`` holds the architecture's own metadata, ``(key, value, type)`` in file order
with type a short name of ``gguf.writer.TYPE_NAMES`` (``"u32"``, ``"f32"``, ``"str"``, ...;
``write_model`` adds ``general.*`` before and the tokenizer after), and its ``TensorSpec``
list in file order. A ``TensorSpec`` names a tensor, its stored numpy-order shape (rows last),
its type and its init recipe: ``normal(std)`` or ``constant(value)``, or any
``init(rng, shape) -> float32 array`` that draws values in C order (so slabs drawn one after
another equal one big draw).
``transposed=True`` stores each 2-D plane transposed: values are drawn in the plane's logical
shape ``shape[-1], shape[-2]`` and written as its transpose, so both layouts hold the same
numbers for the same seed.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Callable

import numpy as np

from pocketlm import quant
from pocketlm.gguf.writer import KV, RawKV, Tensor, copy_kv, write_gguf

ARCH_MODULES = ("pocketlm.tools.synth_smallthinker", "pocketlm.tools.synth_embbert",
                "pocketlm.tools.synth_minicpm", "pocketlm.tools.synth_qwen3moe",
                "pocketlm.tools.synth_qwen2moe", "pocketlm.tools.synth_mixtral",
                "pocketlm.tools.synth_olmoe", "pocketlm.tools.synth_granitemoe",
                "pocketlm.tools.synth_gpt_oss")
# Elements per slab of a 2-D tensor: bounds the float32 draw and its quantization temporaries.
SLAB_ELEMS = 1 << 22

Init = Callable[[np.random.Generator, tuple], np.ndarray]


def normal(std: float) -> Init:
    """N(0, std²) draws (float32 standard normals times a float32 std)."""
    s = np.float32(std)
    return lambda rng, shape: rng.standard_normal(shape, dtype=np.float32) * s


def constant(value: float) -> Init:
    """A constant (norm gains); draws nothing from the stream."""
    return lambda rng, shape: np.full(shape, value, dtype=np.float32)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # numpy order as stored: (planes, rows, row length)
    qtype: str
    init: Init
    transposed: bool = False  # store each plane transposed (see the module docstring)


@dataclass(frozen=True)
class SynthModel:
    arch: str
    metadata: list[tuple[str, object, str]]
    tensors: list[TensorSpec]


@dataclass(frozen=True)
class Options:
    """Generation options; an architecture rejects the ones it cannot honour."""

    seed: int = 1234
    qtype: str = "Q4_0"              # type of the weight matrices (norms and routers stay F32)
    recipe: str = "routed"           # init recipe: "routed" (benchmarks) or "plain" N(0, 0.02)
    attn_scale: float | None = None  # attention output std / 0.02 (None: the recipe's)
    gating: str = "sigmoid"          # sigmoid | softmax | none (no gating key written)
    sliding_window: bool | None = None  # None: the preset's layout
    down_transposed: bool = False    # PowerInfer's layout of ffn_down_exps
    name: str | None = None          # general.name (default: from the preset)
    description: str | None = None   # general.description (default: the recipe and seed)
    overrides: dict = field(default_factory=dict)  # preset shape fields to change


def presets() -> dict[str, object]:
    """Every preset name → the architecture module that owns it."""
    out = {}
    for name in ARCH_MODULES:
        mod = import_module(name)
        for p in mod.PRESETS:
            if p in out:
                raise ValueError(f"preset {p!r} is defined by {out[p].__name__} and {name}")
            out[p] = mod
    return out


def weight_types() -> tuple[str, ...]:
    """Types the weight matrices can be written in (those with a llama.cpp file type)."""
    from pocketlm.quant.requantize import FTYPES
    return tuple(t for t in FTYPES if t in quant.QUANTIZE_QTYPES)


def default_tokenizer() -> Path:
    """SmolLM2's GGUF from the model store (its tokenizer is the default one to copy)."""
    from pocketlm.api import store
    try:
        return store.resolve("smollm2-135m", pull_missing=False)
    except store.StoreError:
        raise ValueError("no tokenizer: pass --tokenizer GGUF (e.g. llama.cpp's "
                         "ggml-vocab-qwen2.gguf), or `pocketlm pull smollm2-135m` first") from None


def _slabs(spec: TensorSpec, rng: np.random.Generator):
    """The tensor's values as float32 slabs in storage order, drawn in C order."""
    shape = spec.shape
    if spec.transposed:
        for _ in range(int(np.prod(shape[:-2], dtype=np.int64))):
            yield spec.init(rng, (shape[-1], shape[-2])).T
        return
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    step = max(1, SLAB_ELEMS // shape[-1])
    for r in range(0, rows, step):
        yield spec.init(rng, (min(step, rows - r), shape[-1]))


def _encoded(spec: TensorSpec, rng: np.random.Generator):
    """The tensor's stored bytes, slab by slab (drawn only as the writer asks for them)."""
    for slab in _slabs(spec, rng):
        yield quant.quantize(spec.qtype, np.ascontiguousarray(slab))


def _check(model: SynthModel):
    for t in model.tensors:
        if t.qtype not in quant.QUANTIZE_QTYPES:
            raise ValueError(f"{t.name}: cannot write tensors of type {t.qtype}")
        bs = quant.block_size(t.qtype)
        if t.shape[-1] % bs:
            raise ValueError(f"{t.name}: row length {t.shape[-1]} is not a multiple of the "
                             f"{t.qtype} block size {bs}; choose another --type")


def write_model(model: SynthModel, out: str | os.PathLike, tokenizer_kv: list[RawKV],
                seed: int, qtype: str, name: str, description: str,
                progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``model`` to ``out``; ``tokenizer_kv`` are metadata entries copied as they are.

    The file appears under its final name only when complete. ``progress(done, total)`` is
    called after each tensor.
    """
    from pocketlm.quant.requantize import FTYPES, GGML_QNT_VERSION
    _check(model)
    kv = [KV("general.architecture", "str", model.arch), KV("general.type", "str", "model"),
          KV("general.name", "str", name), KV("general.description", "str", description),
          KV("general.file_type", "u32", FTYPES[qtype]),
          KV("general.quantization_version", "u32", GGML_QNT_VERSION)]
    kv += [KV(k, t, v) for k, v, t in model.metadata]
    kv += tokenizer_kv
    # one stream for the whole file: the writer draws each tensor's slabs in file order
    rng = np.random.default_rng(seed)
    tensors = [Tensor(t.name, t.qtype, t.shape, _encoded(t, rng)) for t in model.tensors]
    return write_gguf(out, kv, tensors, progress)


def synthesize(preset: str, out: str | os.PathLike, options: Options = Options(),
               tokenizer: str | os.PathLike | None = None,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """Write the synthetic model ``preset`` to ``out``; returns a summary dict.

    ``tokenizer`` is a GGUF whose ``tokenizer.*`` keys are copied (vocab-only files work);
    default: SmolLM2's from the model store.
    """
    from pocketlm.gguf.reader import open_gguf
    mods = presets()
    if preset not in mods:
        raise ValueError(f"unknown preset {preset!r} (choose from {', '.join(mods)})")
    if options.qtype not in weight_types():
        raise ValueError(f"unsupported weight type {options.qtype!r} "
                         f"(choose from {', '.join(weight_types())})")
    mod = mods[preset]
    tokenizer = Path(tokenizer) if tokenizer else default_tokenizer()
    with open_gguf(tokenizer) as tok:
        tokens = tok.metadata.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ValueError(f"{tokenizer}: has no tokenizer.ggml.tokens to copy")
        n_vocab = len(tokens)
        tokenizer_kv = copy_kv(tok, lambda k: k.startswith("tokenizer."))
    unknown = set(options.overrides) - set(mod.PRESETS[preset])
    if unknown:
        raise ValueError(f"unknown {preset} field(s) {', '.join(sorted(unknown))} (fields: "
                         f"{', '.join(mod.PRESETS[preset])})")
    shape = {**mod.PRESETS[preset], **options.overrides}
    model = mod.build(shape, options, n_vocab)
    name = options.name or f"{mod.ARCH} {preset} synthetic (random weights)"
    description = options.description or (
        f"synthetic random weights, recipe {options.recipe}, seed {options.seed}")
    path = write_model(model, out, tokenizer_kv, options.seed, options.qtype, name, description,
                       progress)
    return {"path": str(path), "preset": preset, "arch": mod.ARCH,
            "size_bytes": path.stat().st_size, "n_tensors": len(model.tensors),
            "n_params": sum(int(np.prod(t.shape)) for t in model.tensors),
            "n_vocab": n_vocab, "tokenizer": str(tokenizer), "seed": options.seed,
            "type": options.qtype, "recipe": options.recipe}


# -- routing statistics ---------------------------------------------------------------------------
def trace_routing(llm, ids: list[int]) -> list[np.ndarray]:
    """Expert ids chosen for ``ids`` (teacher-forced from position 0): per layer (n, k).

    The prompt is evaluated in prefill chunks of ``llm.chunk``; the router reads each layer's
    input, which is the same function of the prefix as in one-token decode steps.
    """
    from pocketlm.experts.stats import tap_routing
    from pocketlm.generate.loop import prefill
    model = llm.model
    if not model.capabilities.moe:
        raise ValueError(f"{llm.gguf.path}: architecture {llm.gguf.arch!r} has no expert "
                         "routing to measure")
    per_layer: dict[int, list[np.ndarray]] = {}

    def record(layer, sel):
        per_layer.setdefault(layer, []).append(sel.copy())
    with tap_routing(model, record):
        prefill(model, model.new_cache(len(ids), llm.chunk), ids, llm.chunk)
    return [np.concatenate(per_layer[i]) for i in sorted(per_layer)]


def routing_stats(trace: list[np.ndarray], n_expert: int) -> dict:
    """Statistics of per-layer expert choices ``trace[layer]`` (n tokens, k) over E experts.

    ``entropy``: entropy of the expert-usage distribution divided by log E (1 = every expert
    used equally, 0 = one expert only); ``overlap``: mean |A ∩ B| / k of consecutive tokens'
    sets (random routing gives k / E on average); ``used``: share of experts chosen at all.
    ``overall`` averages the layers.
    """
    layers = []
    for sel in trace:
        n, k = sel.shape
        counts = np.bincount(sel.ravel(), minlength=n_expert)            # (E,)
        p = counts[counts > 0] / counts.sum()
        onehot = np.zeros((n, n_expert), dtype=bool)                       # (n, E)
        onehot[np.arange(n)[:, None], sel] = True
        overlap = (onehot[1:] & onehot[:-1]).sum(axis=1) / k               # (n - 1,)
        layers.append({"entropy": float(-(p * np.log(p)).sum() / np.log(n_expert)),
                       "overlap": float(overlap.mean()) if n > 1 else float("nan"),
                       "used": float((counts > 0).sum() / n_expert)})
    keys = ("entropy", "overlap", "used")
    k = trace[0].shape[1]
    return {"n_tokens": int(trace[0].shape[0]), "n_expert": n_expert, "k": int(k),
            "chance_overlap": k / n_expert,
            "overall": {key: float(np.mean([lay[key] for lay in layers])) for key in keys},
            "layers": layers}


def default_text() -> Path:
    """The evaluation text of the shared data (``$POCKETLM_SHARED``, else ../shared)."""
    shared = Path(os.environ.get("POCKETLM_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    return shared / "data" / "eval" / "papers.txt"


def model_routing(model: str, text_path: str | os.PathLike | None = None, n_tokens: int = 512,
                  threads: int | None = None) -> dict:
    """Routing statistics of ``model`` (store name or path) over the first ``n_tokens`` tokens
    of a UTF-8 text file (default: ``default_text()``)."""
    from pocketlm import LLM
    from pocketlm.api import store
    if n_tokens < 2:
        raise ValueError(f"--tokens must be at least 2, got {n_tokens}")
    model = store.resolve(model, pull_missing=True)   # a missing model is the first problem
    text_path = Path(text_path) if text_path else default_text()
    if not text_path.is_file():
        raise ValueError(f"text file {text_path} not found; pass --text FILE")
    text = text_path.read_bytes().decode("utf-8")
    with LLM.load(model, threads=threads, n_ctx=n_tokens) as llm:
        ids = llm.tokenize(text)[:n_tokens]
        if len(ids) < 2:
            raise ValueError(f"{text_path}: fewer than 2 tokens")
        stats = routing_stats(trace_routing(llm, ids), llm.model.args.n_expert)
        head = {"model": str(llm.gguf.path), "text": str(text_path),
                "mode": f"teacher-forced prefill, chunks of {llm.chunk}"}
    return {**head, **stats}


def format_routing(s: dict) -> str:
    rows = [f"routing of {s['model']} over {s['n_tokens']} tokens of {s['text']} "
            f"({s['mode']}); top-{s['k']} of {s['n_expert']} experts",
            "layer  entropy  overlap  used"]
    for i, lay in enumerate(s["layers"]):
        rows.append(f"{i:5d}  {lay['entropy']:7.3f}  {lay['overlap']:7.3f}  {lay['used']:4.2f}")
    o = s["overall"]
    rows.append(f"  all  {o['entropy']:7.3f}  {o['overlap']:7.3f}  {o['used']:4.2f}")
    rows.append(f"(random routing: entropy ~1, overlap {s['chance_overlap']:.3f})")
    return "\n".join(rows)


# -- command line (pocketlm synth) ---------------------------------------------------------------
def add_arguments(ap):
    """``pocketlm synth PRESET OUT [options]`` and ``pocketlm synth stats MODEL [options]``."""
    sub = ap.add_subparsers(dest="preset", metavar="PRESET|stats", required=True)
    for name, mod in presets().items():
        s = sub.add_parser(name, help=f"write a synthetic {mod.ARCH} model")
        s.add_argument("output", metavar="OUT", help="output .gguf path")
        s.add_argument("--seed", type=int, default=Options.seed, help="random seed (default 1234)")
        s.add_argument("--type", default=Options.qtype, help="weight type: Q4_0 (default), "
                       "Q4_1, Q5_0, Q5_1, Q8_0, F16, BF16 or F32; norms and routers stay F32")
        s.add_argument("--recipe", default=Options.recipe, choices=("routed", "plain"),
                       help="init: routed (default; routing varies per token) or plain "
                            "N(0, 0.02)")
        s.add_argument("--attn-scale", type=float, default=None, metavar="S",
                       help="attention output init std = 0.02 x S (default: the recipe's; "
                            "larger S, more locality in routing)")
        s.add_argument("--gating", default=Options.gating,
                       choices=("sigmoid", "softmax", "none"),
                       help="router gating function; none: no gating key (PowerInfer's files)")
        s.add_argument("--sliding-window", action=argparse.BooleanOptionalAction, default=None,
                       help="write the sliding-window key (default: the preset's layout)")
        s.add_argument("--down-transposed", action="store_true",
                       help="store ffn_down_exps transposed, as PowerInfer's converter does")
        s.add_argument("--tokenizer", metavar="GGUF", default=None,
                       help="copy the tokenizer of this GGUF (default: SmolLM2's, from the store)")
        s.add_argument("--set", metavar="FIELD=VALUE", action="append", default=[],
                       help="change a preset shape field, e.g. --set n_layer=8 (repeatable)")
    s = sub.add_parser("stats", help="routing statistics of an MoE model over a text")
    s.add_argument("model", metavar="MODEL", help="store name or .gguf path")
    s.add_argument("--text", metavar="FILE", default=None,
                   help="UTF-8 text, teacher-forced (default: the shared papers.txt)")
    s.add_argument("--tokens", type=int, default=512, help="tokens to run (default 512)")
    s.add_argument("-t", "--threads", type=int, default=None, help="CPU threads")
    s.add_argument("--json", action="store_true", help="print JSON")


def _overrides(items: list[str], shape: dict) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in shape:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of "
                             f"{', '.join(shape)}")
        try:
            out[key] = type(shape[key])(float(value) if isinstance(shape[key], float)
                                        else int(value))
        except ValueError:
            raise ValueError(f"--set {item!r}: {value!r} is not a number") from None
    return out


def run(args, progress=None) -> int:
    import json
    if args.preset == "stats":
        s = model_routing(args.model, args.text, args.tokens, args.threads)
        print(json.dumps(s, indent=2) if args.json else format_routing(s))
        return 0
    shape = presets()[args.preset].PRESETS[args.preset]
    opts = Options(seed=args.seed, qtype=args.type.upper(), recipe=args.recipe,
                   attn_scale=args.attn_scale, gating=args.gating,
                   sliding_window=args.sliding_window, down_transposed=args.down_transposed,
                   overrides=_overrides(args.set, shape))
    r = synthesize(args.preset, args.output, opts, args.tokenizer, progress)
    print(f"wrote {r['path']}: {r['arch']} {r['preset']}, {r['type']}, recipe {r['recipe']}, "
          f"seed {r['seed']}, {r['n_params'] / 1e6:.1f} M params, "
          f"{r['size_bytes'] / 2**20:.1f} MiB, vocab {r['n_vocab']}")
    return 0
