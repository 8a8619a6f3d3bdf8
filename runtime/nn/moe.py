"""Mixture-of-experts FFN: routing and expert evaluation, one mechanism for every MoE model.

A model declares its ``Routing`` and holds its ``Routers``; it routes a layer and announces
the choice to its ``ExpertSource``, which serves the experts: ``ResidentExperts`` (planes of
the memory-mapped 3-D tensors), the disk-streaming cache (``pocketlm.experts``) or the GPU's
slots (``pocketlm.cuda.model``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, runtime_checkable

import numpy as np

from pocketlm.gguf.tensor import QTensor
from pocketlm.nn.ops import CPU, Ops

# "softmax_weight": the top k logits, then a softmax over those k only (gpt-oss)
GATINGS = ("softmax", "sigmoid", "softmax_weight")
# GGUF's expert_gating_func values (llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_*)
GGUF_GATING = {1: "softmax", 2: "sigmoid"}


@dataclass(frozen=True)
class Routing:
    """How a model turns router logits into experts: the top ``k`` per token after ``gating``
    ("softmax" or "sigmoid") over all experts, or ("softmax_weight") by logit with a softmax
    over the k chosen; their weights optionally renormalised to sum to 1 (``renorm``) and
    then multiplied by ``scale``."""

    k: int
    gating: str
    renorm: bool = True
    scale: float = 1.0

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"routing needs at least one expert per token, got k={self.k}")
        if self.gating not in GATINGS:
            raise ValueError(f"unsupported expert gating function {self.gating!r} "
                             f"(expected {' or '.join(GATINGS)})")


def route(logits: np.ndarray, routing: Routing):
    """Top-k experts per token. logits (n, E) → ids (n, k) strongest first, weights (n, k).

    Gating is applied to all experts, then the top k are taken and (optionally) renormalised,
    with the sum clamped as llama.cpp does so a near-zero total cannot blow up.
    """
    z = logits.astype(np.float32)
    if routing.gating == "sigmoid":
        p = 1.0 / (1.0 + np.exp(-z))
    elif routing.gating == "softmax_weight":
        p = z
    else:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
    ids = np.argsort(-p, axis=1, kind="stable")[:, :routing.k]            # (n, k)
    w = np.take_along_axis(p, ids, axis=1)                                # (n, k)
    if routing.gating == "softmax_weight":
        e = np.exp(w - w[:, :1])   # the first is the largest
        w = e / e.sum(axis=1, keepdims=True)
    if routing.renorm:
        w = w / np.maximum(w.sum(axis=1, keepdims=True), np.float32(6.103515625e-5))
    return ids, (w * np.float32(routing.scale)).astype(np.float32)


@dataclass(frozen=True)
class Routers:
    """A model's routers: one router weight (n_expert, n_embd) per layer, sharing a Routing,
    on the ops their weights live on (predictions run there); ``biases``: per layer the
    router's bias (n_expert,) float32 (gpt-oss), or None."""

    weights: tuple
    routing: Routing
    ops: Ops = CPU
    biases: tuple | None = None

    def route(self, layer: int, x: np.ndarray, ops: Ops | None = None):
        """Layer ``layer``'s experts for its router input x (n, n_embd): ids, weights (n, k);
        ``ops``: those of the running forward (default: the routers' own)."""
        b = None if self.biases is None else self.biases[layer]
        return route((ops or self.ops).linear(self.weights[layer], x, b), self.routing)

    def hint_next(self, source, layer: int, x: np.ndarray | None):
        """Hint ``source`` with the experts the next layer's router picks on x, the input of
        ``layer``'s router (the layer input before attention, or the FFN input after it): the
        residual stream changes little from one layer to the next, so they predict the next
        layer's experts well. Nothing after the last layer, or without x."""
        if x is not None and layer + 1 < len(self.weights):
            source.hint(layer + 1, self.route(layer + 1, x)[0])


class Expert:
    """One expert's three matrices: gate, up (n_ff, n_embd) and down (n_embd, n_ff).
    ``addr``: their data's addresses, which the fused decode kernel keeps here once checked."""

    __slots__ = ("gate", "up", "down", "down_t", "addr")

    def __init__(self, gate: QTensor, up: QTensor, down: QTensor, down_t: bool = False):
        self.gate, self.up, self.down, self.down_t = gate, up, down, down_t
        self.addr = None


class NeuronStats:
    """Counts of ReLU-gated neurons that were active (gate > 0) in decode steps."""

    def __init__(self):
        self.active = 0
        self.total = 0

    @property
    def fraction(self) -> float:
        return self.active / self.total if self.total else 0.0


@runtime_checkable
class ExpertSource(Protocol):
    """Where a model's experts come from.

    The model routes a layer and calls ``request(layer, ids, x)`` with the router's choice
    (n, k) as soon as it is known (a streaming source starts reading); ``x`` is the router's
    input (the layer input for pre-attention routers, the FFN input for post-attention
    ones), from which a source given the model's ``Routers`` predicts the next layer.
    ``moe_ffn`` then takes the experts from ``groups(layer, ids)``: lists of (id, Expert)
    pairs covering the unique ids once, each list what is ready together (one decode kernel
    call serves a list); ``each`` gives the same pairs one at a time, in the order they are
    ready.
    ``hint(layer, ids)`` passes a prediction for a later layer to a source that
    ``wants_hints`` (so a source over another forwards its predictions). ``neurons``, when
    set (benchmarks), counts decode's active ReLU-gated neurons in the experts served.

    Sources subclass it for the defaults: no hints wanted, nothing counted.
    """

    wants_hints: bool = False
    neurons: NeuronStats | None = None

    def request(self, layer: int, ids: np.ndarray, x: np.ndarray | None = None) -> None: ...

    def hint(self, layer: int, ids: np.ndarray) -> None: ...

    def each(self, layer: int, ids: np.ndarray) -> Iterator[tuple[int, Expert]]: ...

    def groups(self, layer: int, ids: np.ndarray) -> Iterator[list[tuple[int, Expert]]]:
        """By default one expert per group, as ``each`` yields them (each stays valid until
        the next group is asked for)."""
        for pair in self.each(layer, ids):
            yield [pair]

    def close(self) -> None:
        """Release what the source holds (files, threads); nothing for most."""


def _plane(t: QTensor, e: int) -> QTensor:
    rows = t.shape[1]
    return QTensor(t.qtype, t.shape[1:], t.data[e * rows:(e + 1) * rows])


def down_transposed(gate_shape, down_shape) -> bool:
    """Whether an expert's down matrix is stored transposed, (n_ff, n_embd) like gate/up, as
    PowerInfer's converter may write it; shapes are one expert's, numpy order."""
    n_ff, n_embd = gate_shape
    if tuple(down_shape) == (n_embd, n_ff):
        return False
    if tuple(down_shape) == (n_ff, n_embd):
        return True
    raise ValueError(f"ffn_down_exps planes have shape {tuple(down_shape)}, expected "
                     f"({n_embd}, {n_ff})")


class ResidentExperts(ExpertSource):
    """The ExpertSource of experts read straight from the memory-mapped expert tensors (no
    budget): everything is ready, so requests and predictions need no work."""

    def __init__(self, layers):
        # layers: per layer (gate_exps, up_exps, down_exps) QTensors of shape (E, rows, cols)
        self.layers = [(g, u, d, down_transposed(g.shape[1:], d.shape[1:]))
                       for g, u, d in layers]
        # Planes are kept once made, so kernels' per-weight preparation is done once too.
        self._planes: dict[tuple[int, int], Expert] = {}

    def get(self, layer: int, e: int) -> Expert:
        ex = self._planes.get((layer, e))
        if ex is None:
            gate, up, down, down_t = self.layers[layer]
            ex = Expert(_plane(gate, e), _plane(up, e), _plane(down, e), down_t)
            self._planes[(layer, e)] = ex
        return ex

    def request(self, layer: int, ids, x=None):
        pass

    def hint(self, layer: int, ids):
        pass

    def each(self, layer: int, ids):
        for e in np.unique(ids):
            yield int(e), self.get(layer, int(e))

    def groups(self, layer: int, ids):
        yield list(self.each(layer, ids))    # all ready at once


_ONE_TOKEN = np.zeros(1, np.int64)


def moe_ffn(ops, x: np.ndarray, ids: np.ndarray, weights: np.ndarray, experts: ExpertSource,
            layer: int, act: str, biases=None) -> np.ndarray:
    """sum_k w_k · expert_{ids_k}(x) for x (n, n_embd), each expert on ``ops`` (its
    ``expert`` block); tokens are grouped by expert so each expert's weights are read once
    per call. Experts are taken in the order the source has
    them ready; each token's terms are still added in its own fixed order (strongest first),
    so the result does not depend on that order. ``biases``: the layer's expert biases
    (gate (E, n_ff), up (E, n_ff), down (E, n_embd)) float32 (gpt-oss), kept resident
    beside any streamed experts (they are small)."""
    n, k = ids.shape
    parts = np.zeros((n, k, x.shape[1]), dtype=np.float32)                # (n, k, n_embd)
    # decode: one token, whose k experts are distinct; no search for the expert's tokens
    slot_of = {int(e): j for j, e in enumerate(ids[0])} if n == 1 else None
    for group in experts.groups(layer, ids):
        if slot_of is not None and biases is None:   # the group's experts in one call
            ys = ops.experts_decode([ex for _, ex in group], x, act, experts.neurons)
            if ys is not None:
                for (e, _), y in zip(group, ys):
                    np.multiply(y, weights[0, slot_of[e]], out=parts[0, slot_of[e]])
                continue
        for e, ex in group:
            if slot_of is not None:
                tok, slot = _ONE_TOKEN, slot_of[e]
                xe = x
            else:
                tok, slot = np.nonzero(ids == e)
                xe = x[tok]
            if biases is None:
                y = ops.expert(ex, xe, act, experts.neurons)
            else:
                y = ops.expert(ex, xe, act, experts.neurons, bias=tuple(b[e] for b in biases))
            parts[tok, slot] = weights[tok, slot][..., None] * y
    out = parts[:, 0].copy()
    for j in range(1, k):
        out += parts[:, j]
    return out
