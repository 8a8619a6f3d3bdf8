"""Eviction policies of the expert cache: lru, lfu, predictive, and the oracle for benchmarks.

A policy keeps its statistics per expert key (they outlive evictions) and mirrors those of
the cached experts in per-slot arrays, so that choosing a victim is a few numpy operations
over the slots instead of Python work per slot (which, run by the I/O threads under the
cache lock, took the cores from the kernels at large budgets). The cache calls
``touch(key, step, slot)`` on every use (slot None when the key is not cached),
``filled(slot, key)`` when a slot is given to a key, and ``victim(slots, ...)`` for the
slot to evict among the candidate ``slots`` (ties: the lowest slot).
"""
from __future__ import annotations

import bisect
import math

import numpy as np


class LRU:
    """Evict the least recently used expert."""

    def __init__(self, n_layers: int, n_slots: int = 0, **_):
        self.last: dict = {}
        self.slot_last = np.full(n_slots, -1.0)

    def touch(self, key, step: int, slot=None):
        self.last[key] = step
        if slot is not None:
            self.slot_last[slot] = step

    def filled(self, slot: int, key):
        self.slot_last[slot] = self.last.get(key, -1)

    def victim(self, slots, step: int, layer: int, keys, where) -> int:
        return int(slots[np.argmin(self.slot_last[slots])])


class LFU:
    """Evict the expert with the lowest use count, decayed with a half-life of ``half_life``
    tokens so old popularity fades."""

    def __init__(self, n_layers: int, half_life: float = 16.0, n_slots: int = 0, **_):
        self.rate = math.log(2) / (half_life * n_layers)   # per layer step
        self.score: dict = {}                               # key -> (count, at step)
        self.slot_s = np.zeros(n_slots)
        self.slot_t = np.zeros(n_slots)

    def _now(self, key, step):
        s, t = self.score.get(key, (0.0, step))
        return s * math.exp(-self.rate * (step - t))

    def touch(self, key, step: int, slot=None):
        s = self._now(key, step) + 1.0
        self.score[key] = (s, step)
        if slot is not None:
            self.slot_s[slot], self.slot_t[slot] = s, step

    def filled(self, slot: int, key):
        self.slot_s[slot], self.slot_t[slot] = self.score.get(key, (0.0, 0))

    def _slot_scores(self, slots, step):
        return self.slot_s[slots] * np.exp(-self.rate * (step - self.slot_t[slots]))

    def victim(self, slots, step: int, layer: int, keys, where) -> int:
        return int(slots[np.argmin(self._slot_scores(slots, step))])


class Predictive(LFU):
    """ExpertFlow-style: estimate when each cached expert will next be used and evict the one
    expected latest (Belady's rule on a prediction). An expert of layer l is next needed
    ``d`` layer steps ahead (the layer cycle), with probability ``p``: 1 for the router's
    prediction of the next layer, else its decayed use frequency in its layer."""

    def __init__(self, n_layers: int, half_life: float = 16.0, n_slots: int = 0, **_):
        super().__init__(n_layers, half_life, n_slots)
        self.n_layers = n_layers
        self.predicted: set = set()
        self.slot_layer = np.zeros(n_slots, np.int64)

    def layer_call(self, layer: int, step: int):
        self.touch(("call", layer), step)

    def filled(self, slot: int, key):
        super().filled(slot, key)
        self.slot_layer[slot] = key[0]

    def victim(self, slots, step: int, layer: int, keys, where) -> int:
        L = self.n_layers
        lk = self.slot_layer[slots]
        d = (lk - layer - 1) % L + 1
        calls = np.array([self._now(("call", i), step) for i in range(L)])[lk]
        p = np.divide(self._slot_scores(slots, step), calls, out=np.zeros(len(slots)),
                      where=calls > 0)
        wait = d / np.maximum(p, 1e-3)
        sure = [where[k] for k in self.predicted if k in where]
        if sure:
            hit = np.isin(slots, sure)
            wait[hit] = d[hit]
        return int(slots[np.argmax(wait)])


class Oracle:
    """Belady's offline optimum: evict the expert whose next use lies farthest in the future.
    Needs the whole access trace in advance: one (layer, expert ids) entry per layer step."""

    def __init__(self, n_layers: int, trace=None, **_):
        if trace is None:
            raise ValueError("the oracle policy needs the routing trace of the run in advance")
        self.uses: dict = {}
        for step, (layer, ids) in enumerate(trace):
            for e in set(int(i) for i in ids):
                self.uses.setdefault((layer, e), []).append(step)

    def touch(self, key, step: int, slot=None):
        pass

    def filled(self, slot: int, key):
        pass

    def victim(self, slots, step: int, layer: int, keys, where) -> int:
        def next_use(s):   # a benchmark reference: per-slot Python is fine here
            u = self.uses.get(keys[s], ())
            i = bisect.bisect_right(u, step)
            return u[i] if i < len(u) else math.inf
        return int(max(slots, key=next_use))


POLICIES = {"lru": LRU, "lfu": LFU, "predictive": Predictive, "oracle": Oracle}
