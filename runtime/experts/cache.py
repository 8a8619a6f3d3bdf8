"""Experts streamed from disk under a memory budget: the cache of expert slots.

``ExpertCache`` owns one preallocated anonymous arena of fixed-size slots, maps (layer, expert)
to a slot, and fills slots from I/O threads (reads release the GIL, so they overlap the main
thread's Numba/BLAS compute). Its queue serves the current layer's experts first (known exactly
when the router runs before attention) and speculative reads for the next layer second. A slot
that is loading, in use or wanted by the running layer is never evicted; among the others an
eviction policy chooses (``pocketlm.experts.policies``). The bytes come from an
``ExpertStore`` (``pocketlm.experts.store``).

Streaming never changes a number: a slot's planes are the file's bytes, and they go through
the same kernels as memory-mapped experts.
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
import mmap
import os
import threading
import time

import numpy as np

from pocketlm.experts.policies import POLICIES, Predictive
from pocketlm.experts.stats import CacheStats
from pocketlm.experts.store import ExpertStore
from pocketlm.nn.moe import Expert, ExpertSource
from pocketlm.gguf.tensor import QTensor

EMPTY, LOADING, READY = 0, 1, 2
URGENT, SPECULATIVE = 0, 1


class ExpertCache(ExpertSource):
    """Experts in a fixed arena of ``n_slots`` slots, filled from ``store`` by I/O threads.

    An ExpertSource: the model calls ``request(layer, ids, x)`` as soon as a layer's routing
    is known (before attention, for a pre-attention router) and then iterates
    ``each(layer, ids)``, which yields experts as they become ready, each pinned while the
    caller uses it. Given the model's ``routers``, the cache predicts the next layer's experts
    from the ``x`` of a request and reads them speculatively; ``hint`` takes a prediction made
    elsewhere (a source stacked over this one).
    """

    wants_hints = True

    def __init__(self, store: ExpertStore, n_slots: int, policy: str = "lru",
                 io_threads: int | None = None, trace=None, min_precision: float = 0.5,
                 speculate: bool = True, routers=None):
        if n_slots < 1:
            raise ValueError("the expert cache needs at least one slot")
        if io_threads is None:
            # One I/O thread per core, 2..6: each thread's wake-ups and bookkeeping take CPU
            # and the GIL from the kernels (on 2 cores, 1 GiB budget, uniform routing:
            # 2 threads 4.6 tok/s, 3: 4.5, 4: 4.2, 6: 3.6-3.9).
            io_threads = max(2, min(6, os.cpu_count() or 2))
        if policy not in POLICIES:
            raise ValueError(f"unknown cache policy {policy!r} "
                             f"(choose from {', '.join(POLICIES)})")
        self.store = store
        self.routers = routers
        self.n_layers = max(store.layers) + 1
        self.policy_name = policy
        self.policy = POLICIES[policy](self.n_layers, trace=trace, n_slots=n_slots)
        self.n_slots = n_slots
        self.slot_bytes = store.slot_bytes
        self.arena = mmap.mmap(-1, n_slots * self.slot_bytes)   # anonymous: page-aligned
        self._arena_np = np.frombuffer(self.arena, np.uint8)
        self._view = memoryview(self.arena)
        self.key = [None] * n_slots
        self.state = np.full(n_slots, EMPTY, np.int8)
        self.pins = np.zeros(n_slots, np.int32)
        self.expert: list = [None] * n_slots
        self.error: list = [None] * n_slots
        self.where: dict = {}
        self.cv = threading.Condition()
        self.queue: list = []
        self.queued: dict = {}
        self._seq = itertools.count()
        self.wanted: set = set()
        self.step = 0
        self.layer = 0
        self.predicted: dict = {}      # layer -> set of predicted ids (last hint)
        # speculative reads: allowed at all, and on now (off while predictions miss)
        self.min_precision = min_precision
        self.may_speculate = self.speculate = speculate
        self.recent_precision = 1.0
        self.stats = CacheStats()
        self.read_log: list | None = None   # a list: every completed read's (layer, e)
        self._closed = False
        self.threads = [threading.Thread(target=self._worker, daemon=True,
                                         name=f"pocketlm-io-{i}") for i in range(io_threads)]
        for t in self.threads:
            t.start()

    def set_policy(self, policy: str, trace=None):
        if policy not in POLICIES:
            raise ValueError(f"unknown cache policy {policy!r} "
                             f"(choose from {', '.join(POLICIES)})")
        with self.cv:
            self.policy_name = policy
            self.policy = POLICIES[policy](self.n_layers, trace=trace, n_slots=self.n_slots)
            for s, k in enumerate(self.key):
                if k is not None:
                    self.policy.filled(s, k)

    def reset(self):
        """Empty the cache and zero the statistics (nothing may be in use)."""
        with self.cv:
            while (self.state == LOADING).any() or self.queue:
                self.queue.clear()
                self.queued.clear()
                self.cv.wait(0.01)
            self.where.clear()
            self.key = [None] * self.n_slots
            self.state[:] = EMPTY
            self.expert = [None] * self.n_slots
            self.wanted, self.predicted, self.step = set(), {}, 0
            self.speculate = self.may_speculate
            self.recent_precision = 1.0
            self.stats = CacheStats()

    def snapshot(self) -> "CacheStats":
        with self.cv:
            return dataclasses.replace(self.stats)

    # -- model side ------------------------------------------------------------------------------
    def request(self, layer: int, ids, x=None):
        """The experts ``layer`` needs now: start reading the missing ones, urgently; then,
        with routers and the router input ``x``, the next layer's predicted ones."""
        keys = {(layer, int(e)) for e in np.unique(ids)}
        with self.cv:
            self.step += 1
            self.layer = layer
            if isinstance(self.policy, Predictive):
                self.policy.layer_call(layer, self.step)
                self.policy.predicted = set()
            self._score_prediction(layer, {e for _, e in keys})
            self.wanted = set(keys)
            for k in keys:
                s = self.where.get(k)
                nbytes = self.store.expert_bytes(layer)
                if s is not None and self.state[s] == READY:
                    self.stats.hit_bytes += nbytes
                else:
                    self.stats.miss_bytes += nbytes
                    if s is None:
                        self._enqueue(k, URGENT)
                self.policy.touch(k, self.step, s)
            self.cv.notify_all()
        if self.routers is not None:   # outside the lock: the I/O threads need it meanwhile
            self.routers.hint_next(self, layer, x)

    def hint(self, layer: int, ids):
        """A prediction of the experts ``layer`` will need: read them if slots allow."""
        pred = {int(e) for e in np.unique(ids)}
        with self.cv:
            self.predicted[layer] = pred
            if isinstance(self.policy, Predictive):
                self.policy.predicted = {(layer, e) for e in pred}
            if not self.speculate:
                return
            for e in pred:
                k = (layer, e)
                if k not in self.where and k not in self.queued:
                    self._enqueue(k, SPECULATIVE)
            self.cv.notify_all()

    def each(self, layer: int, ids):
        """Yield (expert id, Expert) for the unique ``ids`` of ``layer``, ready ones first; each
        stays pinned until the caller is done with its group (``groups``)."""
        for group in self.groups(layer, ids):
            yield from group

    def groups(self, layer: int, ids):
        """Yield lists of (expert id, Expert) covering the unique ``ids`` of ``layer``: each
        list every expert ready at that moment (at least one, waited for), pinned until the
        caller asks for the next list."""
        remaining = {int(e) for e in np.unique(ids)}
        if not {(layer, e) for e in remaining} <= self.wanted:
            self.request(layer, ids)
        while remaining:
            group, slots = [], []
            with self.cv:
                t0 = None
                while True:
                    e, s = self._ready_one(layer, remaining)
                    if e is not None:
                        break
                    if t0 is None:
                        t0 = time.perf_counter()
                    self.cv.wait(0.05)
                if t0 is not None:
                    self.stats.wait_s += time.perf_counter() - t0
                try:
                    while e is not None:
                        self.pins[s] += 1
                        slots.append(s)
                        self.wanted.discard((layer, e))
                        remaining.discard(e)
                        group.append((e, self.expert[s]))
                        e, s = self._ready_one(layer, remaining) if remaining else (None, None)
                except BaseException:   # another expert's read failed: nothing stays pinned
                    for s in slots:
                        self.pins[s] -= 1
                    raise
            try:
                yield group
            finally:
                with self.cv:
                    for s in slots:
                        self.pins[s] -= 1
                    self.cv.notify_all()

    def _ready_one(self, layer, remaining):
        for e in remaining:
            k = (layer, e)
            s = self.where.get(k)
            if s is None:
                if k not in self.queued:
                    self._enqueue(k, URGENT)
                elif self.queued[k] != URGENT:
                    self._enqueue(k, URGENT)
                continue
            if self.state[s] == READY:
                return e, s
            if self.error[s] is not None:
                err, self.error[s] = self.error[s], None
                del self.where[k]
                raise err
        return None, None

    def _score_prediction(self, layer: int, actual: set):
        pred = self.predicted.pop(layer, None)
        if pred is None:
            return
        st = self.stats
        hit = len(pred & actual)
        st.pred_n += 1
        st.pred_tp += hit
        st.pred_fp += len(pred) - hit
        st.pred_fn += len(actual) - hit
        # recent precision decides (prefill chunks predict far better than decode steps)
        self.recent_precision += 0.1 * (hit / max(len(pred), 1) - self.recent_precision)
        if st.pred_n >= 16 and self.may_speculate:
            p = self.recent_precision
            # speculative reads that mostly miss cost bandwidth the urgent reads need
            if self.speculate and p < self.min_precision:
                self.speculate = False
            elif not self.speculate and p >= self.min_precision + 0.1:
                self.speculate = True

    # -- I/O side ----------------------------------------------------------------------------------
    def _enqueue(self, key, prio: int):
        self.queued[key] = prio
        heapq.heappush(self.queue, (prio, next(self._seq), key))

    def _free_slot(self, prio: int):
        """A slot to fill: an empty one, else the policy's victim among evictable slots."""
        for s in np.flatnonzero(self.state == EMPTY):
            if self.error[s] is None:
                return int(s)
        free = (self.state == READY) & (self.pins == 0)
        keep = list(self.wanted)
        if prio == SPECULATIVE:
            # a guess must not push out what the running layer or another guess needs
            keep += [(l, e) for l, ids in self.predicted.items() for e in ids]
        for k in keep:
            s = self.where.get(k)
            if s is not None:
                free[s] = False
        cands = np.flatnonzero(free)
        if not len(cands):
            return None
        s = self.policy.victim(cands, self.step, self.layer, self.key, self.where)
        victim = self.key[s]
        del self.where[victim]
        self.key[s], self.state[s], self.expert[s] = None, EMPTY, None
        self.stats.evictions += 1
        return s

    def _worker(self):
        while True:
            with self.cv:
                while True:
                    if self._closed:
                        return
                    job = self._next_job()
                    if job is not None:
                        break
                    self.cv.wait()
                key, slot, prio = job
            t0 = time.perf_counter()
            try:
                ex = self._load(key, slot)
                err = None
            except Exception as exc:   # reported to the consumer of this expert
                ex, err = None, exc
            dt = time.perf_counter() - t0
            with self.cv:
                self.stats.read_s += dt
                self.stats.reads += 1
                if prio == SPECULATIVE:
                    self.stats.speculative_reads += 1
                if err is None:
                    self.state[slot], self.expert[slot] = READY, ex
                    self.stats.bytes_read += self.store.expert_bytes(key[0])
                    if self.read_log is not None:
                        self.read_log.append(key)
                else:
                    self.where.pop(key, None)
                    self.key[slot], self.state[slot], self.error[slot] = None, EMPTY, err
                    if key in self.wanted:   # hand the error to the waiting consumer
                        self.where[key] = slot
                self.cv.notify_all()

    def _next_job(self):
        while self.queue:
            prio, _, key = self.queue[0]
            if self.queued.get(key) != prio or key in self.where:
                heapq.heappop(self.queue)           # stale entry
                if self.queued.get(key) == prio:
                    del self.queued[key]
                continue
            slot = self._free_slot(prio)
            if slot is None:
                if prio == SPECULATIVE:
                    heapq.heappop(self.queue)
                    del self.queued[key]
                    continue
                return None                          # wait for a slot to be released
            heapq.heappop(self.queue)
            del self.queued[key]
            self.where[key] = slot
            self.key[slot], self.state[slot] = key, LOADING
            self.policy.filled(slot, key)
            return key, slot, prio
        return None

    def _load(self, key, slot: int) -> Expert:
        layer, e = key
        base = slot * self.slot_bytes
        starts = self.store.read(layer, e, self._view[base:base + self.slot_bytes])
        mats = []
        for plane, start in zip(self.store.layers[layer], starts):
            rows, cols = plane.shape
            a = base + start
            data = self._arena_np[a:a + plane.nbytes].reshape(rows, plane.nbytes // rows)
            # a new QTensor: scales prepared from the old contents belong to the old one
            mats.append(QTensor(plane.qtype, plane.shape, data))
        return Expert(*mats, down_t=self.store.down_t[layer])

    def close(self):
        with self.cv:
            self._closed = True
            self.cv.notify_all()
        for t in self.threads:
            t.join()
        self.store.close()
        # the arena is unmapped when the last view of it (an Expert still held) goes
        self.expert = [None] * self.n_slots
        self._view = self._arena_np = self.arena = None
