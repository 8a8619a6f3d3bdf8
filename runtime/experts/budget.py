"""The memory budget: what a loaded model costs, and how many expert slots fit in the rest.

The budget covers the whole process: the interpreter and its libraries with the compiled
kernels (measured as the process's resident size when the plan is made), the resident weights
(everything but the routed experts, memory-mapped, so their page cache is charged, plus the
kernels' prepared scale arrays), the KV cache at full context, scratch activations for one
prefill chunk, and the expert arena. A budget that cannot hold the model with the fewest
workable expert slots is refused with the minimum that would work. That minimum includes
headroom for what the process adds after the plan (the model's compiled code and caches on its
first generation), so passing it back is accepted, later in the same process too.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import psutil

from pocketlm import kernels

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_MIB = 1 << 20
# the process grows after the plan: 20-26 MiB on a first generation (compiled model code,
# caches), then a few KiB a load
HEADROOM = 64 * _MIB


class MemoryBudgetError(ValueError):
    """The model cannot run within the given memory budget."""


def parse_size(text) -> int:
    """Bytes from ``1GiB``, ``1.5G``, ``800M``, ``512MB`` or a plain number of bytes.

    K/M/G/T and KiB/MiB/GiB/TiB are powers of 1024; KB/MB/GB/TB powers of 1000.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        unit = m.group(2).lower() if m else None
        if not m or unit not in _UNITS:
            raise ValueError(f"memory size {text!r}: expected a number with an optional unit "
                             f"such as 800M, 1.5GiB or 2GB")
        value = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"memory size {text!r}: expected a finite positive size")
    return int(value)


def format_size(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


@dataclass
class MemoryPlan:
    budget: int
    baseline: int        # process before the model: interpreter, libraries, kernels
    resident: int        # weights other than routed experts, with prepared scales
    kv_cache: int
    scratch: int
    slot_bytes: int      # one expert slot: its planes' buffers and prepared scales
    n_slots: int         # 0 for a model without routed experts
    n_experts: int       # routed experts in the file
    minimum: int         # the smallest budget accepted from now on: whole MiB, with HEADROOM

    @property
    def arena(self) -> int:
        return self.n_slots * self.slot_bytes

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["arena"] = self.arena
        return d


def _is_expert(name: str) -> bool:
    return name.endswith("_exps.weight")


def resident_bytes(g) -> int:
    """Bytes of the weights that stay mapped (all but routed experts), plus prepared scales."""
    total = 0
    for name, t in g.tensors.items():
        if _is_expert(name):
            continue
        total += t.nbytes
        if len(t.shape) == 2:
            total += kernels.prepared_nbytes(t.qtype, t.shape[0], t.shape[1])
    return total


def kv_cache_bytes(model, n_ctx: int, chunk: int) -> int:
    a = model.args
    item = 4 + (2 if model.kv_half_copy else 0)   # float32, and the float16 copy
    total = 0
    for w in model.layer_windows():
        slots = n_ctx if w <= 0 else min(n_ctx, w + chunk)
        total += slots * (2 * a.n_head_kv * a.head_dim * item + 8)
    return total


def scratch_bytes(model, n_ctx: int, chunk: int) -> int:
    """Activations of one prefill chunk: attention scores for all heads over the context (the
    largest term), a contiguous copy of a layer's values for its BLAS products,
    residual/projection buffers, the expert outputs and one row of logits."""
    a = model.args
    n = min(chunk, n_ctx)
    scores = a.n_head * n * n_ctx * 4 + a.n_head_kv * a.head_dim * n_ctx * 4
    ffn = getattr(a, "n_ff_exp", 0) or getattr(a, "n_ff", 0)
    k = getattr(a, "n_expert_used", 1)
    acts = n * 4 * (16 * a.n_embd + 3 * a.n_head * a.head_dim + (k + 2) * a.n_embd + 3 * ffn)
    return scores + acts + a.n_vocab * 4 + (4 << 20)   # + the BLAS dequantization tile


def slot_bytes(store) -> int:
    scales = max(sum(kernels.prepared_nbytes(p.qtype, *p.shape) for p in planes)
                 for planes in store.layers.values())
    return store.slot_bytes + scales


def plan(model, g, store, n_ctx: int, chunk: int, budget: int,
         baseline: int | None = None) -> MemoryPlan:
    """How ``model`` fits ``budget`` bytes; raises MemoryBudgetError if it cannot.

    The arena leaves HEADROOM free when the budget allows; a budget below the reported
    minimum but still holding the fewest slots runs with them, so a minimum reported earlier
    in this process stays accepted while the process grows by less than HEADROOM."""
    if baseline is None:
        baseline = psutil.Process().memory_info().rss
    resident = resident_bytes(g)
    kv = kv_cache_bytes(model, n_ctx, chunk)
    scratch = scratch_bytes(model, n_ctx, chunk)
    fixed = baseline + resident + kv + scratch
    n_slots = n_experts = per_slot = min_slots = 0
    if store is not None:
        per_slot = slot_bytes(store)
        n_experts = sum(store.n_expert.values())
        # the running layer's experts plus as many again for the next layer's reads
        min_slots = 2 * model.args.n_expert_used
        n_slots = min(n_experts, max(min_slots, (budget - fixed - HEADROOM) // per_slot))
    need = fixed + min_slots * per_slot
    minimum = -(-(need + HEADROOM) // _MIB) * _MIB   # whole MiB: the message gives it exactly
    p = MemoryPlan(budget, baseline, resident, kv, scratch, per_slot, n_slots, n_experts,
                   minimum)
    if budget < need:
        raise MemoryBudgetError(
            f"memory budget {format_size(budget)} is too small for {g.path} at context "
            f"{n_ctx}: it needs at least {minimum // _MIB} MiB (process "
            f"{format_size(baseline)}, weights {format_size(resident)}, KV cache "
            f"{format_size(kv)}, activations {format_size(scratch)}"
            + (f", {min_slots} expert slots of {format_size(per_slot)}"
               if store is not None else "") + f", headroom {format_size(HEADROOM)})")
    return p


def check_context(model, n_ctx: int, chunk: int) -> None:
    """Refuse a context whose KV cache at full length exceeds the memory available now.

    The cache's arrays are allocated lazily, so an oversized one would load and then grow
    the process as the context fills (with huge pages, its first tokens already touch
    gigabytes)."""
    kv = kv_cache_bytes(model, n_ctx, chunk)
    available = psutil.virtual_memory().available
    if kv > available:
        raise MemoryBudgetError(
            f"a {n_ctx}-token context needs {format_size(kv)} of KV cache; "
            f"{format_size(available)} of memory is available (lower n_ctx / -c)")
