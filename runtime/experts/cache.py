"""Experts streamed from disk under a memory budget.

``ExpertStore`` reads one expert's gate/up/down planes (each a contiguous byte range of a 3-D
``*_exps`` tensor, the expert being the slowest axis) with ``os.preadv`` into page-aligned
buffers, with ``O_DIRECT`` where the filesystem allows it so the page cache neither doubles the
memory nor hides the cost; otherwise buffered reads followed by ``POSIX_FADV_DONTNEED``.

``ExpertCache`` owns one preallocated anonymous arena of fixed-size slots, maps (layer, expert)
to a slot, and fills slots from I/O threads (reads release the GIL, so they overlap the main
thread's Numba/BLAS compute). Its queue serves the current layer's experts first (known exactly
when the router runs before attention) and speculative reads for the next layer second. A slot
that is loading, in use or wanted by the running layer is never evicted; among the others an
eviction policy chooses (``POLICIES``).

Streaming never changes a number: a slot's planes are the file's bytes, and they go through
the same kernels as memory-mapped experts.
"""
from __future__ import annotations

import bisect
import errno
import heapq
import itertools
import math
import mmap
import os
import threading
import time
import dataclasses
from dataclasses import dataclass

import numpy as np

from pocketlm import kernels
from pocketlm.nn.moe import Expert, ExpertSource, down_transposed
from pocketlm.gguf.tensor import QTensor

ALIGN = 4096  # O_DIRECT needs offsets, lengths and buffer addresses aligned to the block size
PARTS = ("gate", "up", "down")

EMPTY, LOADING, READY = 0, 1, 2
URGENT, SPECULATIVE = 0, 1


def _align_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class _Plane:
    qtype: str
    shape: tuple[int, int]   # one expert's matrix, numpy order (rows, cols)
    offset: int              # absolute file offset of expert 0's plane
    nbytes: int              # bytes of one expert's plane

    def region(self) -> int:
        """Aligned buffer bytes that hold this plane wherever it starts in the file."""
        return _align_up(self.nbytes + ALIGN - 1)


class ExpertStore:
    """Reads experts' planes from a GGUF file; one instance per open model file."""

    def __init__(self, path: str, layers: dict[int, tuple[_Plane, _Plane, _Plane]],
                 n_expert: dict[int, int], down_t: dict[int, bool], direct: bool = True):
        self.path = path
        self.layers = layers
        self.n_expert = n_expert
        self.down_t = down_t
        self.direct = False
        self.fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                self.direct = True
            except OSError:
                pass
        if self.fd < 0:
            self.fd = os.open(path, os.O_RDONLY)
        self.region = [max(p[i].region() for p in layers.values()) for i in range(3)]
        self.slot_bytes = sum(self.region)

    @classmethod
    def from_gguf(cls, g, direct: bool = True) -> "ExpertStore | None":
        """The store for a GGUF's ``blk.N.ffn_{gate,up,down}_exps`` tensors; None if it has none."""
        layers, n_expert, down_t = {}, {}, {}
        for name, info in g.tensors.items():
            parts = name.split(".")
            if len(parts) != 4 or parts[0] != "blk" or parts[2] != "ffn_gate_exps":
                continue
            i = int(parts[1])
            infos = [g.tensors.get(f"blk.{i}.ffn_{p}_exps.weight") for p in PARTS]
            if any(t is None for t in infos):
                raise ValueError(f"{g.path}: layer {i} lacks one of the ffn_*_exps tensors")
            n_exp = infos[0].shape[0]
            planes = []
            for t in infos:
                if len(t.shape) != 3 or t.shape[0] != n_exp:
                    raise ValueError(f"{g.path}: {t.name} has shape {t.shape}, expected "
                                     f"({n_exp}, rows, cols)")
                planes.append(_Plane(t.qtype, tuple(t.shape[1:]), t.offset, t.nbytes // n_exp))
            layers[i] = tuple(planes)
            n_expert[i] = n_exp
            down_t[i] = down_transposed(infos[0].shape[1:], infos[2].shape[1:])
        if not layers:
            return None
        return cls(g.path, layers, n_expert, down_t, direct)

    def expert_bytes(self, layer: int) -> int:
        return sum(p.nbytes for p in self.layers[layer])

    def read(self, layer: int, e: int, slot: memoryview) -> list[int]:
        """Read expert ``e`` of ``layer`` into a page-aligned slot buffer; the planes' starts
        in it."""
        if self.direct:
            try:
                return self._read(layer, e, slot)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # the filesystem took O_DIRECT at open but refuses it on reads
                self.direct = False
                fd, self.fd = self.fd, os.open(self.path, os.O_RDONLY)
                os.close(fd)
        return self._read(layer, e, slot)

    def _read(self, layer: int, e: int, slot: memoryview) -> list[int]:
        starts, base = [], 0
        for plane, size in zip(self.layers[layer], self.region):
            off = plane.offset + e * plane.nbytes
            buf = slot[base:base + size]
            if self.direct:
                lead = off % ALIGN
                self._read_fully(buf[:_align_up(lead + plane.nbytes)], off - lead,
                                 lead + plane.nbytes)
                starts.append(base + lead)
            else:
                self._read_fully(buf[:plane.nbytes], off, plane.nbytes)
                os.posix_fadvise(self.fd, off, plane.nbytes, os.POSIX_FADV_DONTNEED)
                starts.append(base)
            base += size
        return starts

    def _read_fully(self, buf: memoryview, off: int, need: int):
        got = 0
        while got < need:
            n = os.preadv(self.fd, [buf[got:]], off + got)
            if n <= 0:
                raise OSError(f"{self.path}: expert data ends early at byte {off + got}")
            got += n

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# -- eviction policies ----------------------------------------------------------------------------
# A policy keeps its statistics per expert key (they outlive evictions) and mirrors those of
# the cached experts in per-slot arrays, so that choosing a victim is a few numpy operations
# over the slots instead of Python work per slot (which, run by the I/O threads under the
# cache lock, took the cores from the kernels at large budgets). The cache calls
# ``touch(key, step, slot)`` on every use (slot None when the key is not cached),
# ``filled(slot, key)`` when a slot is given to a key, and ``victim(slots, ...)`` for the
# slot to evict among the candidate ``slots`` (ties: the lowest slot).
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


# -- the cache ------------------------------------------------------------------------------------
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
        with routers and the layer input ``x``, the next layer's predicted ones."""
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
        stays pinned until the caller asks for the next."""
        remaining = {int(e) for e in np.unique(ids)}
        if not {(layer, e) for e in remaining} <= self.wanted:
            self.request(layer, ids)
        while remaining:
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
                self.pins[s] += 1
                self.wanted.discard((layer, e))
                remaining.discard(e)
                ex = self.expert[s]
            try:
                yield e, ex
            finally:
                with self.cv:
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
            mats.append(kernels.refresh(QTensor(plane.qtype, plane.shape, data)))
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


@dataclass
class CacheStats:
    hit_bytes: int = 0      # requested expert bytes already in the cache
    miss_bytes: int = 0
    bytes_read: int = 0
    reads: int = 0
    speculative_reads: int = 0
    evictions: int = 0
    read_s: float = 0.0     # I/O threads' time reading (summed over threads)
    wait_s: float = 0.0     # main thread's time waiting for experts
    pred_n: int = 0
    pred_tp: int = 0
    pred_fp: int = 0
    pred_fn: int = 0

    @property
    def precision(self) -> float:
        n = self.pred_tp + self.pred_fp
        return self.pred_tp / n if n else 0.0

    @property
    def recall(self) -> float:
        n = self.pred_tp + self.pred_fn
        return self.pred_tp / n if n else 0.0

    def minus(self, other: "CacheStats") -> "CacheStats":
        return CacheStats(**{f.name: getattr(self, f.name) - getattr(other, f.name)
                             for f in dataclasses.fields(self)})

    def as_dict(self, n_tokens: int = 1) -> dict:
        """Figures for a run over ``n_tokens`` tokens (hidden: share of read time that the
        main thread did not spend waiting)."""
        total = self.hit_bytes + self.miss_bytes
        return {
            "hit_rate_bytes": self.hit_bytes / total if total else 0.0,
            "bytes_read": self.bytes_read,
            "bytes_read_per_token": self.bytes_read / max(n_tokens, 1),
            "reads": self.reads, "speculative_reads": self.speculative_reads,
            "evictions": self.evictions, "read_s": self.read_s, "wait_s": self.wait_s,
            "read_hidden": (max(0.0, 1.0 - self.wait_s / self.read_s) if self.read_s > 0
                            else 1.0),
            "prediction_precision": self.precision, "prediction_recall": self.recall,
        }
