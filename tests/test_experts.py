"""Experts streamed from disk: the store reads the file's bytes, the cache never changes a
number whatever its size or policy, the budget planner refuses what cannot fit."""
import mmap
import os

import numpy as np
import pytest

from pocketlm.models import load_model
from pocketlm.nn import moe
from pocketlm.experts.budget import MemoryBudgetError, parse_size, plan
from pocketlm.experts.cache import ExpertCache
from pocketlm.experts.policies import POLICIES
from pocketlm.experts.store import ExpertStore
from pocketlm.experts.stats import tap_routing
from pocketlm.gguf.reader import open_gguf
from pocketlm.generate.loop import prefill


@pytest.fixture(scope="module")
def tiny(smallthinker_tiny_path):
    g = open_gguf(smallthinker_tiny_path)
    yield g, load_model(g)
    g.close()


def _run(model, ids, n_prefill):
    """Logits of a chunked prefill then one decode step per remaining token."""
    cache = model.new_cache(len(ids), 8)
    rows = [prefill(model, cache, ids[:n_prefill], 8, n_logits=n_prefill)]
    for t in ids[n_prefill:]:
        pos = np.array([cache.n_past], dtype=np.int64)
        rows.append(model.forward(np.array([t], dtype=np.int64), pos, cache))
        cache.n_past += 1
    return np.concatenate(rows)


IDS = [int(i) for i in np.random.default_rng(5).integers(100, 40000, size=28)]


@pytest.mark.parametrize("direct", [True, False])
def test_store_reads_the_files_expert_bytes(tiny, direct):
    g, model = tiny
    store = ExpertStore.from_gguf(g, direct=direct)
    resident = moe.ResidentExperts(
        [(L.ffn_gate_exps, L.ffn_up_exps, L.ffn_down_exps) for L in model.w.blk])
    buf = mmap.mmap(-1, store.slot_bytes)   # page-aligned, as O_DIRECT needs
    try:
        for layer in store.layers:
            for e in range(store.n_expert[layer]):
                starts = store.read(layer, e, memoryview(buf))
                want = resident.get(layer, e)
                for plane, start, mat in zip(store.layers[layer], starts,
                                             (want.gate, want.up, want.down)):
                    got = np.frombuffer(buf, np.uint8, plane.nbytes, start)
                    assert np.array_equal(got, mat.data.reshape(-1))
    finally:
        store.close()


def streamed_vs_resident(g, model, policy: str, n_slots: int, ids=IDS):
    """Logits of ``ids`` with resident experts, and streamed through a cache of ``n_slots``
    under ``policy`` (the oracle traced from a first pass), plus the cache's statistics."""
    resident = model.experts
    ref = _run(model, ids, 20)
    trace = []
    if policy == "oracle":
        with tap_routing(model, lambda layer, ids_: trace.append((layer, np.unique(ids_)))):
            _run(model, ids, 20)
    cache = ExpertCache(ExpertStore.from_gguf(g), n_slots, policy, trace=trace or None,
                        routers=model.routers)
    try:
        model.experts = cache
        got = _run(model, ids, 20)
        stats = cache.snapshot()
    finally:
        model.experts = resident
        cache.close()
    return ref, got, stats


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("n_slots", [1, 5, 32])
def test_streaming_never_changes_a_number(tiny, policy, n_slots):
    g, model = tiny
    ref, got, stats = streamed_vs_resident(g, model, policy, n_slots)
    assert np.array_equal(got, ref)
    assert stats.bytes_read > 0
    if n_slots == 32:   # everything fits: each expert is read at most once
        assert stats.evictions == 0 and stats.reads <= 32


def test_oracle_misses_no_more_than_lru(tiny):
    g, model = tiny
    resident, trace = model.experts, []
    with tap_routing(model, lambda layer, ids: trace.append((layer, np.unique(ids)))):
        _run(model, IDS, 4)
    misses = {}
    for policy in ("lru", "oracle"):
        # without speculative reads, misses are the policy's alone
        cache = ExpertCache(ExpertStore.from_gguf(g), 6, policy, trace=trace,
                            speculate=False, routers=model.routers)
        try:
            model.experts = cache
            _run(model, IDS, 4)
            misses[policy] = cache.snapshot().miss_bytes
        finally:
            model.experts = resident
            cache.close()
    assert misses["oracle"] <= misses["lru"]


def test_sources_conform_to_the_protocol(tiny):
    """Resident, disk-streamed and device experts are ExpertSources (the device one checked by
    its methods' signatures: making one needs a GPU)."""
    import inspect
    from pocketlm.cuda.model import DeviceExperts
    g, model = tiny
    cache = ExpertCache(ExpertStore.from_gguf(g), 4)
    try:
        assert isinstance(model.experts, moe.ExpertSource)
        assert isinstance(cache, moe.ExpertSource)
    finally:
        cache.close()
    for name in ("request", "hint", "each"):
        want = inspect.signature(getattr(moe.ExpertSource, name)).parameters
        got = inspect.signature(getattr(DeviceExperts, name)).parameters
        assert list(got) == list(want), name


def test_cache_predicts_the_next_layer_from_the_request(tiny):
    """Given the routers, a request with the layer input hints the next layer's router choice
    on that input; without routers, or without the input, nothing is predicted."""
    g, model = tiny
    x = np.random.default_rng(2).standard_normal((3, model.args.n_embd)).astype(np.float32)
    sel = model.routers.route(0, x)[0]
    want = {int(e) for e in np.unique(model.routers.route(1, x)[0])}
    for routers, given, predicted in ((model.routers, x, {1: want}), (None, x, {}),
                                      (model.routers, None, {})):
        cache = ExpertCache(ExpertStore.from_gguf(g), 32, routers=routers)
        try:
            cache.request(0, sel, given)
            assert cache.predicted == predicted
        finally:
            cache.close()


def test_read_error_reaches_the_caller(tiny):
    g, model = tiny
    store = ExpertStore.from_gguf(g)
    cache = ExpertCache(store, 4)
    os.close(store.fd)   # every read now fails
    store.fd = os.open(os.devnull, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="ends early"):
            for _ in cache.each(0, np.array([[1, 2]])):
                pass
    finally:
        cache.close()


def test_groups_serve_what_is_ready_together_and_pin_it(tiny):
    """Experts already read come in one group (one decode kernel call), pinned while the
    caller holds the group and released when it asks for the next; each group's experts are
    the ones asked for, once."""
    g, model = tiny
    cache = ExpertCache(ExpertStore.from_gguf(g), 8)
    try:
        layer = min(cache.store.layers)
        ids = np.array([[3, 1, 2]])
        got = [e for grp in cache.groups(layer, ids) for e, _ in grp]   # reads them
        assert sorted(got) == [1, 2, 3] and not any(cache.pins)
        gen = cache.groups(layer, ids)
        first = next(gen)
        assert sorted(e for e, _ in first) == [1, 2, 3]                 # all ready: one group
        assert sum(cache.pins) == 3
        assert next(gen, None) is None and not any(cache.pins)
    finally:
        cache.close()


def test_parse_size():
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("1.5G") == 3 << 29
    assert parse_size("800M") == 800 << 20
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size(4096) == 4096
    for bad in ("", "lots", "1XB", "-1G", "0", "inf", float("inf"), float("nan"), -5, 0.0):
        with pytest.raises(ValueError, match="^memory size [^\n]*$"):
            parse_size(bad)


def test_budget_plan(tiny):
    g, model = tiny
    store = ExpertStore.from_gguf(g)
    try:
        base = 100 << 20
        with pytest.raises(MemoryBudgetError, match="needs at least"):
            plan(model, g, store, 256, 64, 101 << 20, baseline=base)
        p = plan(model, g, store, 256, 64, 1 << 30, baseline=base)
        assert p.n_slots == p.n_experts == 32           # everything fits
        small = plan(model, g, store, 256, 64, p.minimum, baseline=base)
        # the fewest workable slots, and what rounding the minimum up to a MiB buys
        fewest = 2 * model.args.n_expert_used
        assert fewest <= small.n_slots <= fewest + (1 << 20) // small.slot_bytes
        assert small.minimum == p.minimum
        assert small.minimum % (1 << 20) == 0     # the message gives it exactly, in MiB
        # the parts add up to what the budget must cover
        assert small.baseline + small.resident + small.kv_cache + small.scratch + \
            small.arena <= small.budget
    finally:
        store.close()


def test_planned_kv_bytes_are_the_caches(smallthinker_tiny_path):
    """The plan counts what the cache allocates: without a budget the cache keeps a float16
    copy for decode beside its float32 arrays; under a budget it keeps none, and those bytes
    go to expert slots."""
    from pocketlm import LLM
    from pocketlm.experts.budget import kv_cache_bytes
    with LLM.load(str(smallthinker_tiny_path), n_ctx=128) as llm:
        layer = llm.cache.layers[0]
        assert layer.kt16 is not None and layer.kt16.dtype == np.float16
        slot_pos = sum(c.slot_pos.nbytes for c in llm.cache.layers)
        assert kv_cache_bytes(llm.model, 128, llm.chunk) == llm.cache.nbytes + slot_pos
    with LLM.load(str(smallthinker_tiny_path), n_ctx=128, memory_budget="2GiB") as llm:
        assert all(c.kt16 is None for c in llm.cache.layers)
        slot_pos = sum(c.slot_pos.nbytes for c in llm.cache.layers)
        assert kv_cache_bytes(llm.model, 128, llm.chunk) == llm.cache.nbytes + slot_pos
        assert llm.memory_plan.kv_cache == llm.cache.nbytes + slot_pos


def _reported_minimum(error) -> str:
    import re
    return re.search(r"needs at least (\d+ MiB) \(", str(error)).group(1)


def test_reported_minimum_stays_accepted_as_the_process_grows(tiny):
    """The process grows after a plan (compiled model code on the first generation): the
    minimum reported at one baseline is still accepted at a larger one."""
    g, model = tiny
    store = ExpertStore.from_gguf(g)
    try:
        base = 200 << 20
        with pytest.raises(MemoryBudgetError) as e:
            plan(model, g, store, 256, 64, 1 << 20, baseline=base)
        minimum = parse_size(_reported_minimum(e.value))
        for grown in (0, 1 << 20, 30 << 20, 60 << 20):
            p = plan(model, g, store, 256, 64, minimum, baseline=base + grown)
            assert p.n_slots >= 2 * model.args.n_expert_used
    finally:
        store.close()


def test_minimum_passed_back_is_accepted_every_time(smallthinker_tiny_path):
    """In one process, load after load (each one growing it a little), the minimum that a
    refusal reports loads when passed back."""
    from pocketlm import LLM
    accepted = 0
    for _ in range(3):
        with pytest.raises(MemoryBudgetError) as e:
            LLM.load(str(smallthinker_tiny_path), n_ctx=128, memory_budget="1MiB")
        minimum = _reported_minimum(e.value)
        with LLM.load(str(smallthinker_tiny_path), n_ctx=128, memory_budget=minimum) as llm:
            llm.eval(IDS[:4])
            accepted += 1
    assert accepted == 3


def test_context_larger_than_memory_is_refused_at_load(smollm2_path):
    from pocketlm import LLM
    with pytest.raises(MemoryBudgetError,
                       match=r"^\S+\.gguf: a 10000000-token context needs [\d.]+ GiB of KV "
                             r"cache; [\d.]+ \w+ of memory is available"):
        LLM.load(str(smollm2_path), n_ctx=10_000_000)


def test_memcap_enforces_a_real_limit():
    """tools.memcap (used to verify budgets) really caps a process: an allocation above the
    cap is killed, one below it runs."""
    import subprocess
    import sys
    from pocketlm.tools.memcap import run_capped
    alloc = "import numpy as np; a = np.ones({} << 20, np.uint8); print(a.sum())"
    try:
        rc, report = run_capped(300 << 20, [sys.executable, "-c", alloc.format(50)])
    except OSError as e:
        pytest.skip(f"no memory cgroup here: {e}")
    assert rc == 0 and report["oom_kills"] == 0 and report["peak_bytes"] > 50 << 20
    rc, report = run_capped(300 << 20, [sys.executable, "-c", alloc.format(600)])
    assert rc != 0 and report["oom_kills"] >= 1
    assert subprocess.run([sys.executable, "-m", "pocketlm.tools.memcap", "nonsense", "--", "true"],
                          capture_output=True).returncode == 1


@pytest.mark.parametrize("preset,overrides,opts", [
    # MiniCPM-MoE: routed after attention (prefetch from the FFN input), SwiGLU experts, softmax gating
    ("minicpm-moe", dict(n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=128, n_ctx=256,
                         dim_model_base=32), {}),
    # SmallThinker's 21B layout (NoPE global + sliding-window layers) with softmax gating
    ("tiny", dict(n_layer=5), dict(sliding_window=True, gating="softmax")),
])
def test_budget_streams_every_moe_model_unchanged(tmp_path, smollm2_path, preset, overrides,
                                                  opts):
    from pocketlm import LLM
    from pocketlm.tools.synth import Options, synthesize
    path = tmp_path / "m.gguf"
    synthesize(preset, path, Options(overrides=overrides, **opts), tokenizer=smollm2_path)
    ids = IDS[:12]
    with LLM.load(str(path), n_ctx=64) as llm:
        ref = llm.eval(ids)
    with LLM.load(str(path), n_ctx=64, memory_budget="2GiB") as llm:
        llm.model.experts.close()
        n_slots = llm.memory_plan.n_experts // 3     # force evictions: a third fits
        llm.model.experts = ExpertCache(ExpertStore.from_gguf(llm.gguf), n_slots, "lfu",
                                        routers=llm.model.routers)
        got = llm.eval(ids)
        assert llm.model.experts.snapshot().evictions > 0
    assert np.array_equal(got, ref)


def test_policies_pick_their_victims():
    """Each policy's choice on a hand-made history (slots 0..3 hold experts 0..3 of layer 0)."""
    from pocketlm.experts.policies import LFU, LRU, Predictive
    keys = [(0, e) for e in range(4)]
    where = {k: s for s, k in enumerate(keys)}
    slots = np.arange(4)
    for cls in (LRU, LFU, Predictive):
        p = cls(n_layers=2, n_slots=4)
        for s, k in enumerate(keys):
            p.filled(s, k)
        # expert 2 used often long ago, expert 1 once just now, 0 and 3 in between
        for step in range(1, 5):
            p.touch(keys[2], step, 2)
        for step, e in ((40, 0), (41, 3), (42, 1)):
            p.touch(keys[e], step, e)
        if cls is Predictive:
            p.layer_call(0, 42)
        got = p.victim(slots, 43, 0, keys, where)
        # LRU: the least recent (2). LFU and Predictive: 2's four early uses, decayed over
        # ~40 steps, still outweigh the single use of 0 three steps ago (the least)
        want = {LRU: 2, LFU: 0, Predictive: 0}[cls]
        assert got == want, (cls.__name__, got)
        assert p.victim(np.array([0, 3]), 43, 0, keys, where) in (0, 3)
    p = Predictive(n_layers=2, n_slots=4)
    for s, k in enumerate(keys):
        p.filled(s, k)
        p.touch(k, 1, s)
    for _ in range(4):          # layer 0 ran 4 times, each expert was used once
        p.layer_call(0, 1)
    p.predicted = {keys[0], keys[1], keys[2]}      # the router says these come next
    assert p.victim(slots, 2, 1, keys, where) == 3


def test_closing_the_llm_closes_a_wrapped_disk_cache(smallthinker_tiny_path):
    """close() reaches the disk cache through sources that wrap it (a routing tap): its I/O
    threads end and its file is released."""
    from pocketlm import LLM
    llm = LLM.load(str(smallthinker_tiny_path), n_ctx=64, memory_budget="2GiB")
    cache = llm.model.experts
    assert isinstance(cache, ExpertCache) and any(t.is_alive() for t in cache.threads)
    with tap_routing(llm.model, lambda layer, ids: None):
        llm.close()
    assert not any(t.is_alive() for t in cache.threads)


def test_read_log_and_replay(tiny):
    """The cache logs each completed read; replaying the log reads the same experts again,
    computing nothing (the benchmark's read-bound limit), and a key the file lacks is an
    error, not a silent skip."""
    g, model = tiny
    cache = ExpertCache(ExpertStore.from_gguf(g), 4)
    try:
        cache.read_log = []
        layer = min(cache.store.layers)
        cache.request(layer, np.array([0, 1, 2]))
        got = sorted(e for e, _ in cache.each(layer, np.array([0, 1, 2])))
        assert got == [0, 1, 2]
        assert sorted(cache.read_log) == [(layer, 0), (layer, 1), (layer, 2)]
        assert cache.store.replay(cache.read_log, 2) > 0
        with pytest.raises(Exception):
            cache.store.replay([(layer, 10 ** 6)], 1)
    finally:
        cache.close()
