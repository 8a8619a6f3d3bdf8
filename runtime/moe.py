"""Mixture-of-experts FFN: routing and expert evaluation, one mechanism for every MoE model.

Experts come from an expert source: ``ResidentExperts`` serves planes of the memory-mapped 3-D
tensors; a streaming source (reading experts from disk under a memory budget) offers the same
``get(layer, expert)`` interface.
"""
from __future__ import annotations

import numpy as np

from runtime import nn
from runtime.tensor import QTensor

GATING_SOFTMAX = 1
GATING_SIGMOID = 2


def route(logits: np.ndarray, k: int, gating: int, renorm: bool = True):
    """Top-k experts per token. logits (n, E) → ids (n, k) strongest first, weights (n, k).

    Gating is applied to all experts, then the top k are taken and (optionally) renormalised,
    with the sum clamped as llama.cpp does so a near-zero total cannot blow up.
    """
    z = logits.astype(np.float32)
    if gating == GATING_SIGMOID:
        p = 1.0 / (1.0 + np.exp(-z))
    elif gating == GATING_SOFTMAX:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
    else:
        raise ValueError(f"unsupported expert gating function {gating}")
    ids = np.argsort(-p, axis=1, kind="stable")[:, :k]                    # (n, k)
    w = np.take_along_axis(p, ids, axis=1)                                # (n, k)
    if renorm:
        w = w / np.maximum(w.sum(axis=1, keepdims=True), np.float32(6.103515625e-5))
    return ids, w.astype(np.float32)


class Expert:
    """One expert's three matrices: gate, up (n_ff, n_embd) and down (n_embd, n_ff)."""

    __slots__ = ("gate", "up", "down", "down_t")

    def __init__(self, gate: QTensor, up: QTensor, down: QTensor, down_t: bool = False):
        self.gate, self.up, self.down, self.down_t = gate, up, down, down_t


def _plane(t: QTensor, e: int) -> QTensor:
    rows = t.shape[1]
    return QTensor(t.qtype, t.shape[1:], t.data[e * rows:(e + 1) * rows])


class ResidentExperts:
    """Experts read straight from the memory-mapped expert tensors (no budget)."""

    def __init__(self, layers):
        # layers: per layer (gate_exps, up_exps, down_exps) QTensors of shape (E, rows, cols)
        self.layers = []
        for gate, up, down in layers:
            n_ff, n_embd = gate.shape[1], gate.shape[2]
            # PowerInfer's converter may store down transposed, (E, n_ff, n_embd) like gate/up
            down_t = down.shape[1:] == (n_ff, n_embd) and n_ff != n_embd
            if not down_t and down.shape[1:] != (n_embd, n_ff):
                raise ValueError(f"ffn_down_exps has shape {down.shape}, expected "
                                 f"(E, {n_embd}, {n_ff})")
            self.layers.append((gate, up, down, down_t))
        # Planes are kept once made, so kernels' per-weight preparation is done once too.
        self._planes: dict[tuple[int, int], Expert] = {}

    def get(self, layer: int, e: int) -> Expert:
        ex = self._planes.get((layer, e))
        if ex is None:
            gate, up, down, down_t = self.layers[layer]
            ex = Expert(_plane(gate, e), _plane(up, e), _plane(down, e), down_t)
            self._planes[(layer, e)] = ex
        return ex


def moe_ffn(x: np.ndarray, ids: np.ndarray, weights: np.ndarray, experts, layer: int,
            act: str) -> np.ndarray:
    """sum_k w_k · expert_{ids_k}(x) for x (n, n_embd); tokens are grouped by expert so each
    expert's weights are read once per call."""
    out = np.zeros(x.shape, dtype=np.float32)                             # (n, n_embd)
    for e in np.unique(ids):
        tok, slot = np.nonzero(ids == e)
        ex = experts.get(layer, int(e))
        xe = x[tok]
        h = nn.glu(nn.linear(ex.gate, xe), nn.linear(ex.up, xe), act)    # (m, n_ff)
        if ex.down_t:
            y = h @ ex.down.dequantize()
        else:
            y = nn.linear(ex.down, h)
        out[tok] += weights[tok, slot][:, None] * y
    return out
