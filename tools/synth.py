"""Synthetic GGUF models: random weights at real shapes, streamed to disk tensor by tensor.

``synthesize(preset, out, options)`` writes a GGUF whose metadata uses the keys llama.cpp's
converter writes for the architecture, whose tokenizer (every ``tokenizer.*`` key, byte for
byte) is copied from another GGUF, and whose weights are drawn from one
``numpy.random.default_rng(seed)`` stream in file order and quantized with ``quant.quantize``
(byte-exact with llama.cpp). Only one slab (an expert plane, or a few MiB of rows) is in memory
at a time, so a multi-GB model needs little RAM. The same inputs give the same bytes.

``routing_stats(model, text)`` measures how an MoE model routes a real text: expert-usage
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

``SynthModel`` holds the architecture's own metadata, ``(key, value, GGUFValueType)`` in file
order (the writer adds ``general.*`` before and the tokenizer after), and its ``TensorSpec``
list in file order. A ``TensorSpec`` names a tensor, its stored numpy-order shape (rows last),
its type and its init recipe: ``normal(std)`` or ``constant(value)``, or any
``init(rng, shape) -> float32 array`` that draws values in C order (so slabs drawn one after
another equal one big draw). ``transposed=True`` stores each 2-D plane transposed: values are
drawn in the plane's logical shape ``shape[-1], shape[-2]`` and written as its transpose, so
both layouts hold the same numbers for the same seed.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

import quant
from quant.requantize import FTYPES, GGML_QNT_VERSION, GGUF_VERSION, _raw_kv
from runtime.gguf import open_gguf

ARCH_MODULES = ("tools.synth_smallthinker",)
ALIGNMENT = 32
WEIGHT_TYPES = tuple(t for t in FTYPES if t in quant.QUANTIZE_QTYPES)
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

    @property
    def nbytes(self) -> int:
        rows = int(np.prod(self.shape[:-1], dtype=np.int64))
        return rows * quant.row_bytes(self.qtype, self.shape[-1])


@dataclass(frozen=True)
class SynthModel:
    arch: str
    metadata: list[tuple[str, object, GGUFValueType]]
    tensors: list[TensorSpec]


@dataclass(frozen=True)
class Options:
    """Generation options; an architecture rejects the ones it cannot honour."""

    seed: int = 1234
    qtype: str = "Q4_0"              # type of the weight matrices (norms and routers stay F32)
    recipe: str = "routed"           # init recipe: "routed" (benchmarks) or "plain" N(0, 0.02)
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
            out[p] = mod
    return out


def default_tokenizer() -> Path:
    """SmolLM2's GGUF from the model store (its tokenizer is the default one to copy)."""
    from runtime import store
    try:
        return store.resolve("smollm2-135m", pull_missing=False)
    except Exception:
        raise ValueError("no tokenizer: pass --tokenizer GGUF (e.g. llama.cpp's "
                         "ggml-vocab-qwen2.gguf), or `pocketlm pull smollm2-135m` first") from None


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


_PACK = {GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f",
         GGUFValueType.UINT64: "<Q", GGUFValueType.BOOL: "<?"}


def _kv(key: str, value, vtype: GGUFValueType) -> bytes:
    head = _string(key) + struct.pack("<I", vtype)
    if vtype == GGUFValueType.STRING:
        return head + _string(value)
    if vtype in _PACK:
        return head + struct.pack(_PACK[vtype], value)
    raise ValueError(f"{key}: cannot write metadata of type {vtype.name}")


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


def _check(model: SynthModel):
    for t in model.tensors:
        if t.qtype not in quant.QUANTIZE_QTYPES:
            raise ValueError(f"{t.name}: cannot write tensors of type {t.qtype}")
        bs = quant.block_size(t.qtype)
        if t.shape[-1] % bs:
            raise ValueError(f"{t.name}: row length {t.shape[-1]} is not a multiple of the "
                             f"{t.qtype} block size {bs}; choose another --type")


def write_gguf(model: SynthModel, out: str | os.PathLike, tokenizer: str | os.PathLike,
               seed: int, qtype: str, name: str, description: str,
               progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``model`` to ``out`` with the tokenizer keys of the GGUF ``tokenizer``.

    The file appears under its final name only when complete. ``progress(done, total)`` is
    called after each tensor.
    """
    _check(model)
    out = Path(out)
    if not out.parent.is_dir():
        raise ValueError(f"cannot write {out}: directory {out.parent} does not exist")
    with open_gguf(tokenizer) as tok:
        tok_kv = [b for k, b in _raw_kv(tok) if k.startswith("tokenizer.")]
    kv = [_kv("general.architecture", model.arch, GGUFValueType.STRING),
          _kv("general.type", "model", GGUFValueType.STRING),
          _kv("general.name", name, GGUFValueType.STRING),
          _kv("general.description", description, GGUFValueType.STRING),
          _kv("general.file_type", FTYPES[qtype], GGUFValueType.UINT32),
          _kv("general.quantization_version", GGML_QNT_VERSION, GGUFValueType.UINT32)]
    kv += [_kv(k, v, t) for k, v, t in model.metadata]
    kv += tok_kv
    header = bytearray(b"GGUF" + struct.pack("<IQQ", GGUF_VERSION, len(model.tensors), len(kv)))
    header += b"".join(kv)
    offset = 0
    for t in model.tensors:
        ne = tuple(reversed(t.shape))
        header += _string(t.name) + struct.pack(f"<I{len(ne)}Q", len(ne), *ne)
        header += struct.pack("<IQ", GGMLQuantizationType[t.qtype], offset)
        offset += t.nbytes + -t.nbytes % ALIGNMENT
    header += bytes(-len(header) % ALIGNMENT)

    rng = np.random.default_rng(seed)
    tmp = out.with_name(out.name + ".part")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            for i, t in enumerate(model.tensors):
                for slab in _slabs(t, rng):
                    f.write(quant.quantize(t.qtype, np.ascontiguousarray(slab)).data)
                f.write(bytes(-t.nbytes % ALIGNMENT))
                if progress is not None:
                    progress(i + 1, len(model.tensors))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def synthesize(preset: str, out: str | os.PathLike, options: Options = Options(),
               tokenizer: str | os.PathLike | None = None,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """Write the synthetic model ``preset`` to ``out``; returns a summary dict.

    ``tokenizer`` is a GGUF whose ``tokenizer.*`` keys are copied (vocab-only files work);
    default: SmolLM2's from the model store.
    """
    mods = presets()
    if preset not in mods:
        raise ValueError(f"unknown preset {preset!r} (choose from {', '.join(mods)})")
    if options.qtype not in WEIGHT_TYPES:
        raise ValueError(f"unsupported weight type {options.qtype!r} "
                         f"(choose from {', '.join(WEIGHT_TYPES)})")
    mod = mods[preset]
    tokenizer = Path(tokenizer) if tokenizer else default_tokenizer()
    with open_gguf(tokenizer) as tok:
        tokens = tok.metadata.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ValueError(f"{tokenizer}: has no tokenizer.ggml.tokens to copy")
        n_vocab = len(tokens)
    shape = {**mod.PRESETS[preset], **options.overrides}
    model = mod.build(shape, options, n_vocab)
    name = options.name or f"{mod.ARCH} {preset} synthetic (random weights)"
    description = options.description or (
        f"synthetic random weights, recipe {options.recipe}, seed {options.seed}")
    path = write_gguf(model, out, tokenizer, options.seed, options.qtype, name, description,
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
    from runtime.generate import prefill
    model = llm.model
    if not hasattr(model, "on_route"):
        raise ValueError(f"{llm.gguf.path}: architecture {llm.gguf.arch!r} has no expert "
                         "routing to measure")
    per_layer: dict[int, list[np.ndarray]] = {}
    model.on_route = lambda layer, sel: per_layer.setdefault(layer, []).append(sel.copy())
    try:
        prefill(model, model.new_cache(len(ids), llm.chunk), ids, llm.chunk)
    finally:
        model.on_route = None
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
