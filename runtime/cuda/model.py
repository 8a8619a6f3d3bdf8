"""Putting a model on the GPU: weights uploaded once, KV cache on the device, experts streamed
into a budgeted set of device slots.

Expert streaming (mixture-of-experts models under ``gpu_budget``): every expert is a slot-sized
set of gate/up/down planes. A model with a pre-attention router calls the expert source's
``request(layer, ids, x)`` before attention; the device source then starts the host→device copies
of the missing experts on a copy stream (through pinned staging buffers), so they travel while
attention runs on the compute stream. ``each`` makes the compute stream wait for a copy on the
GPU (an event), not the host. Slots are evicted least-recently-used, never one the current
layer still needs.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

import numpy as np
from numba import cuda

from pocketlm.nn.moe import Expert, ExpertSource
from pocketlm.gguf.tensor import QTensor

from . import kernels as K
from . import ops
from .ops import DeviceTensor


def upload(model, gpu_budget: int | None = None):
    """Move ``model``'s weights to the GPU in place (see module doc); returns the model."""
    memo: dict[int, object] = {}

    def to_device(name, v):
        key = id(v)
        if key not in memo:
            if isinstance(v, QTensor) and len(v.shape) == 2:
                memo[key] = DeviceTensor.from_host(v, name)
            elif isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype == np.float32:
                memo[key] = ops.upload(v)
            else:  # 3-D expert tensors stay on the host: the expert source streams them
                memo[key] = v
        return memo[key]

    W = model.w
    for prefix, ns in [("", W)] + [(f"blk.{i}.", L) for i, L in enumerate(W.blk)]:
        for name, v in list(vars(ns).items()):
            if name != "blk":
                setattr(ns, name, to_device(prefix + name, v))
    model.output = to_device("output", model.output).head()
    if model.capabilities.moe:
        # the routers as uploaded: the device source predicts from device activations
        model.routers = replace(model.routers, ops=ops.CUDA, weights=tuple(
            to_device(f"blk.{i}.ffn_gate_inp", w) for i, w in enumerate(model.routers.weights)))
        model.experts = DeviceExperts(model.experts, model.args, gpu_budget, model.routers)
    elif gpu_budget is not None:
        raise ValueError("a GPU budget applies to mixture-of-experts models only")
    model.ops = ops.CUDA   # activations, KV cache and the blocks on the device from now on
    model.device = "cuda"
    return model


class DeviceExperts(ExpertSource):
    """An ExpertSource (``pocketlm.nn.moe``) on the GPU over a host one. Given the model's
    ``routers``, it predicts the next layer's experts for a host source that wants hints.

    ``budget``: bytes of device memory for expert slots (None: one slot per expert, so each is
    copied once). At least ``n_expert_used`` slots are needed. Experts of a host source with
    ``get`` (memory-mapped, always ready) are copied as soon as they are requested; those of a
    streaming host source as it yields them.
    """

    def __init__(self, host_source, args, budget: int | None = None, routers=None):
        self.host = host_source
        self.routers = routers
        self.wants_hints = host_source.wants_hints
        gen = host_source.each(0, np.zeros((1, 1), np.int64))
        _, probe = next(gen)
        gen.close()
        self.slot_bytes = sum(t.nbytes for t in (probe.gate, probe.up, probe.down))
        total = args.n_layer * args.n_expert
        n_slots = total if budget is None else min(total, budget // self.slot_bytes)
        need = getattr(args, "n_expert_used", 1)
        if n_slots < need:
            raise ValueError(f"GPU budget of {budget} bytes holds {n_slots} experts; at least "
                             f"{need * self.slot_bytes} bytes ({need} experts) are needed")
        for t, name in ((probe.gate, "expert gate"), (probe.up, "expert up"),
                        (probe.down, "expert down")):
            ops.check_supported(t.qtype, t.shape, name)
        self.slots = [Expert(DeviceTensor.empty_like(probe.gate), DeviceTensor.empty_like(probe.up),
                             DeviceTensor.empty_like(probe.down), probe.down_t)
                      for _ in range(n_slots)]
        self.ready = [None] * n_slots            # event: the slot's copy has landed
        self.where: OrderedDict = OrderedDict()  # (layer, e) -> slot, least recent first
        self.protected: set = set()              # requested for the current layer, not yet used
        self.copy_stream = cuda.stream()
        # pinned staging: a copy from pageable (memory-mapped) memory would not be async
        self.staging = [cuda.pinned_array(self.slot_bytes, np.uint8) for _ in range(2 * need)]
        self.staged = [None] * len(self.staging)  # event: the staging buffer may be reused
        self.next_stage = 0
        self.copies = 0                           # expert copies made (bytes = copies*slot_bytes)

    @property
    def n_slots(self) -> int:
        return len(self.slots)

    def request(self, layer: int, ids, x=None):
        """The experts ``layer`` needs (pre-attention router): start their copies."""
        wanted = [int(e) for e in np.unique(ids)][: self.n_slots]
        self.protected = {(layer, e) for e in wanted}
        missing = [e for e in np.unique(ids).tolist() if (layer, e) not in self.where]
        if missing:   # a streaming host source reads only what the GPU lacks
            self.host.request(layer, np.array(missing, np.int64))
        if hasattr(self.host, "get"):
            for e in wanted:
                if (layer, e) not in self.where:
                    self._load((layer, e), self.host.get(layer, e))
        if self.wants_hints and self.routers is not None:
            self.routers.hint_next(self, layer, x)

    def hint(self, layer: int, ids):
        self.host.hint(layer, ids)

    def close(self):
        self.host.close()   # a disk cache below holds files and I/O threads

    def each(self, layer: int, ids):
        """Yield (expert id, Expert on the device) for the unique ``ids``: resident ones first,
        then the others as the host source delivers them."""
        todo = [int(e) for e in np.unique(ids)]
        for e in [e for e in todo if (layer, e) in self.where]:
            yield e, self._use((layer, e))
        missing = [e for e in todo if (layer, e) not in self.where]
        if missing:
            for e, ex in self.host.each(layer, np.array(missing, np.int64)):
                if (layer, e) not in self.where:
                    self._load((layer, e), ex)
                yield e, self._use((layer, e))

    def _use(self, key) -> Expert:
        s = self.where[key]
        self.where.move_to_end(key)
        self.protected.discard(key)
        if self.ready[s] is not None:
            self.ready[s].wait(ops.stream())     # the compute stream waits on the GPU
            self.ready[s] = None
        return self.slots[s]

    def _load(self, key, ex: Expert):
        if len(self.where) < self.n_slots:
            s = len(self.where)
        else:
            victim = next((k for k in self.where if k not in self.protected), None)
            s = self.where.pop(victim if victim is not None else next(iter(self.where)))
            # kernels still queued may read the slot: let them finish before it is overwritten
            ops.stream().synchronize()
        i = self.next_stage
        self.next_stage = (i + 1) % len(self.staging)
        if self.staged[i] is not None:
            self.staged[i].synchronize()
        buf, at = self.staging[i], 0
        dst = self.slots[s]
        for src, d in ((ex.gate, dst.gate), (ex.up, dst.up), (ex.down, dst.down)):
            part = buf[at:at + src.nbytes].reshape(d.w.shape)
            part[...] = src.data.reshape(d.w.shape)
            d.w.copy_to_device(part, stream=self.copy_stream)
            d.host = src
            at += src.nbytes
        ev = cuda.event()
        ev.record(self.copy_stream)
        self.ready[s] = self.staged[i] = ev
        self.where[key] = s
        self.copies += 1
