"""Building a model from an open GGUF file as a ``LoadConfig`` asks: the part of loading that
the loading process and the kernel-compiling workers (``warmup``) share."""
from __future__ import annotations

import ctypes
import gc
import sys

from pocketlm.api.config import LoadConfig


def build_model(g, c: LoadConfig, device: str):
    """The model of the open GGUF ``g`` set up by ``c`` for ``device`` (before placing it
    there): (model, n_ctx, memory plan or None)."""
    from pocketlm.models import load_model
    m = load_model(g)
    caps = m.capabilities
    if c.backend is not None:
        if len(caps.backends) < 2:
            raise ValueError(f"{g.arch} models have no backend choice (numba only)")
        m.set_backend(c.backend)
    if c.numerics != "auto":
        from pocketlm import nn
        if not caps.generate or device != "cpu" or m.ops is not nn.CPU:
            raise ValueError(f"numerics {c.numerics!r} applies to decoders on the CPU's numba "
                             f"kernels")
        m.ops = nn.LLAMA if c.numerics == "llama" else nn.EXACT
    train_ctx = int(g.get("{arch}.context_length", 4096))
    n_ctx = c.n_ctx or min(train_ctx, 4096)
    if caps.generate and device == "cpu":
        from pocketlm.experts.budget import check_context
        check_context(m, n_ctx, c.chunk)
    memory_plan = None
    if c.memory_budget is not None:
        memory_plan = _apply_budget(g, m, n_ctx, c.chunk, c.memory_budget, c.expert_policy)
    if c.sparse_attention == "on" and not caps.sparse_attention:
        raise ValueError(f"{g.arch} models have no sparse attention")
    # decoders whose computation depends on run settings (context, attention mode)
    if caps.generate:
        m.configure(n_ctx=n_ctx, sparse_attention=c.sparse_attention)
    return m, n_ctx, memory_plan


def _apply_budget(g, model, n_ctx: int, chunk: int, budget: int, policy: str):
    """Check ``budget`` (bytes) against the model; routed experts then stream through a
    cache evicting by ``policy`` (both checked by LoadConfig)."""
    from pocketlm import kernels
    from pocketlm.experts.budget import plan
    from pocketlm.experts.cache import ExpertCache
    from pocketlm.experts.store import ExpertStore
    # the plan measures the process with the model's kernels loaded, and without the freed
    # heap glibc keeps (a closed model's buffers would otherwise count, and the minimum drift)
    kernels.warmup(sorted({t.qtype for t in g.tensors.values()} & set(kernels.QTYPES)))
    gc.collect()
    trim_heap()
    store = ExpertStore.from_gguf(g) if model.capabilities.moe else None
    # decode then reads the float32 cache: the float16 copy's bytes (a third of the cache)
    # hold expert slots instead (4B MoE at 1 GiB: 43 -> 111 slots)
    model.budgeted = True
    try:
        p = plan(model, g, store, n_ctx, chunk, budget)
        if store is not None:
            model.experts = ExpertCache(store, p.n_slots, policy, routers=model.routers)
    except Exception:
        if store is not None:
            store.close()
        raise
    return p


def trim_heap():
    """Give freed heap pages back to the OS: glibc keeps the freed activation and cache
    buffers otherwise, and RSS would not drop after close()."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl)
            pass
