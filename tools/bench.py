"""Model benchmark in llama-bench's terms: pp<N> (prefill) and tg<N> (decode) in tokens/s.

tg is measured after a prompt of ``depth`` tokens (llama-bench's ``-d``), so decode pays for
attention over a realistic cache. Each test runs ``reps`` times after one warm-up; mean ± sd.
"""
from __future__ import annotations

import os
import statistics
import time

import numpy as np

from pocketlm import kernels
from pocketlm.nn import moe
from pocketlm.experts.stats import tap_routing
from pocketlm.generate.loop import peak_rss, prefill


def drop_page_cache(path: str):
    """Ask the kernel to forget the file's cached pages (a cold start, as after a reboot)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _random_tokens(n_vocab: int, n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(100, n_vocab - 1, size=n).tolist()


class _UniformRouters:
    """Routers picking k distinct experts uniformly at random per token and layer, equally
    weighted: the worst case for an expert cache. They stand in for the model's own, which
    its expert source keeps for its predictions."""

    def __init__(self, n_expert: int, k: int, seed: int):
        self.n_expert, self.k = n_expert, k
        self.rng = np.random.default_rng(seed)

    def route(self, layer: int, x, ops=None):
        n = x.shape[0]
        sel = np.argsort(self.rng.random((n, self.n_expert)), axis=1)[:, :self.k]
        return sel, np.full((n, self.k), 1.0 / self.k, np.float32)


def _stretch(tokens: list[int], span: int, r: int) -> list[int]:
    """Repetition r's ``span`` tokens of a text: each repetition reads on from the last
    (wrapping at the end), so a cache never sees the same tokens twice in a row."""
    start = (r * span) % (len(tokens) - span + 1)
    return tokens[start:start + span]


def _run(llm, kind: str, n: int, depth: int, r: int, tokens, log: list | None = None,
         ops=None, experts=None):
    """One timed test; returns (seconds, the ``experts`` cache's figures over the timed part
    only, a decode test's context prefill excluded; None without ``experts``).
    ``tokens``: the text to feed (teacher forcing), or None for random prompts and greedy
    decoding; ``log``: a list that collects the decode's expert reads (streamed experts);
    ``ops``: what decode runs on (default the model's)."""
    model, n_vocab = llm.model, llm.tokenizer.n_vocab

    def start():
        return time.perf_counter(), experts.snapshot() if experts is not None else None

    def done(t0, before):
        dt = time.perf_counter() - t0
        return dt, None if experts is None else experts.snapshot().minus(before)
    if kind == "pp":
        ids = _stretch(tokens, n, r) if tokens is not None else _random_tokens(n_vocab, n, r)
        cache = model.new_cache(n, llm.chunk)
        t0, before = start()
        prefill(model, cache, ids, llm.chunk)
        return done(t0, before)
    ids = (_stretch(tokens, depth + n + 1, r) if tokens is not None
           else _random_tokens(n_vocab, depth + 1, r))
    cache = model.new_cache(depth + n + 1, llm.chunk)
    if depth:
        prefill(model, cache, ids[:depth], llm.chunk)
    tok = ids[depth]
    if log is not None:   # the decode's expert reads, for the read-bound replay
        model.experts.read_log = log
    t0, before = start()
    for i in range(n):
        pos = np.array([cache.n_past], dtype=np.int64)
        logits = model.forward(np.array([tok], dtype=np.int64), pos, cache, ops=ops)
        cache.n_past += 1
        tok = ids[depth + i + 1] if tokens is not None else int(np.argmax(logits[-1]))
    out = done(t0, before)
    if log is not None:
        model.experts.read_log = None
    return out


def _process_age() -> float:
    """Seconds since this process started. On Linux from the kernel's own clock: the start
    time psutil derives goes through the boot time, which /proc gives in whole seconds, so
    its age is off by up to a second."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rpartition(")")[2].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        import psutil
        return time.time() - psutil.Process().create_time()


def startup(llm) -> dict:
    """What a first chat costs, measured before anything else runs in this process: the
    seconds from the process's start to the first token of a one-word chat ("Hi", greedy,
    through the model's own template), and the load and kernel-compile seconds within them.
    ``kernel_cache`` says whether the kernels had to compile ("cold") or came from Numba's
    cache ("warm")."""
    out = {"load_s": llm.load_s, "compile_s": llm.compile_s,
           "kernel_cache": "cold" if llm.compile_s > 0 else "warm"}
    if llm.template is not None:
        t0 = time.perf_counter()
        answer = llm.chat([{"role": "user", "content": "Hi"}], stream=True, temperature=0,
                          max_tokens=1)
        next(answer)
        out["first_token_s"] = time.perf_counter() - t0
        out["process_to_first_token_s"] = _process_age()
        answer.close()
    return out


def decode_breakdown(llm, depth: int, n: int = 32, tokens=None) -> dict:
    """Where a decoded token's time goes, after ``depth`` tokens of context: milliseconds
    per token in total and by op (``nn.TimedOps`` labels: matvec by weight type, attention,
    experts, embed, small ops), and "outside ops": the model's own Python between ops
    (loops, residual adds, routing glue). Time inside an op includes its Python wrapper.
    Run after the decode tests, so that nothing compiles inside the figures."""
    from pocketlm.nn.ops import TimedOps
    timed = TimedOps(llm.model.ops)
    total, _ = _run(llm, "tg", n, depth, 99, tokens, ops=timed)
    ms = {k: 1e3 * v / n for k, v in sorted(timed.times.items(), key=lambda kv: -kv[1])}
    ms["outside ops"] = 1e3 * total / n - sum(ms.values())
    return {"depth": depth, "n_tokens": n, "ms_per_token": 1e3 * total / n, "ms": ms}


def _tests(n_prompt: int, n_gen: int) -> list[tuple[str, int]]:
    return ([("pp", n_prompt)] if n_prompt > 0 else []) + ([("tg", n_gen)] if n_gen > 0 else [])


def bench_model(llm, n_prompt: int = 512, n_gen: int = 128, depth: int = 512, reps: int = 5,
                progress=None, routing: str = "model", text_ids: list[int] | None = None,
                seed: int = 0, oracle: bool = False, io_replay: bool = False) -> dict:
    """Prefill and decode speed of a loaded ``runtime.LLM``; a JSON-friendly dict.

    For MoE models ``routing`` chooses the experts: "model" (the router; random prompts,
    greedy decoding), "text" (the router, fed ``text_ids`` by teacher forcing, so tokens are
    a real text's) or "uniform" (uniform random experts). With experts streamed under a
    memory budget each test also reports the cache's figures; ``oracle`` runs everything
    once to trace the routing, then again with Belady's policy on that trace; ``io_replay``
    replays each decode run's expert reads with no compute and reports the read-bound speed
    (``read_bound_tps``) and the run's share of it.
    """
    first = startup(llm)
    model = llm.model
    experts = model.experts if model.capabilities.moe else None
    if routing not in ("model", "text", "uniform"):
        raise ValueError(f"routing {routing!r}: expected model, text or uniform")
    if routing != "model" and experts is None:
        raise ValueError(f"--routing applies to mixture-of-experts models, not {llm.gguf.arch}")
    tokens = None
    if routing == "text":
        need = max(n_prompt, depth + n_gen + 1)
        if text_ids is None or len(text_ids) < need:
            raise ValueError(f"text routing needs a text of at least {need} tokens")
        tokens = text_ids
    streamed = hasattr(experts, "stats")
    if oracle and not streamed:
        raise ValueError("the oracle policy needs a memory budget (experts streamed)")
    if io_replay and not streamed:
        raise ValueError("--io-replay needs a memory budget (experts streamed)")
    tests = _tests(n_prompt, n_gen)

    def runs():
        routers = model.routers if experts is not None else None
        if routing == "uniform":
            model.routers = _UniformRouters(model.args.n_expert, routers.routing.k, seed)
        out = []
        try:
            for kind, n in tests:
                samples, stats, active = [], [], []
                for r in range(reps + 1):  # the first run warms caches and JIT
                    if experts is not None:   # ReGLU experts count their active neurons
                        experts.neurons = moe.NeuronStats()
                    log = [] if io_replay and kind == "tg" else None
                    dt, delta = _run(llm, kind, n, depth, r, tokens, log,
                                     experts=experts if streamed else None)
                    if r > 0:
                        samples.append(n / dt)
                        if streamed:
                            stats.append(delta.as_dict(n))
                        if log is not None:
                            t_io = experts.store.replay(log, len(experts.threads))
                            stats[-1]["read_bound_tps"] = n / t_io if log else float("inf")
                        if experts is not None and experts.neurons.total:
                            active.append(experts.neurons.fraction)
                    if progress:
                        progress(f"{kind}{n}", r, reps)
                out.append((kind, n, samples, stats, active))
        finally:
            if experts is not None:
                model.routers, experts.neurons = routers, None
        return out

    if oracle:
        trace = []
        experts.set_policy("lru")
        with tap_routing(model, lambda layer, ids: trace.append((layer, ids))):
            runs()
        experts.reset()
        experts.set_policy("oracle", trace=_steps(trace))
    results = []
    for kind, n, samples, stats, active in runs():
        name = f"{kind}{n}" + (f" @ d{depth}" if kind == "tg" and depth else "")
        row = {
            "test": name, "n_tokens": n, "depth": depth if kind == "tg" else 0,
            "tps_mean": statistics.mean(samples),
            "tps_sd": statistics.stdev(samples) if len(samples) > 1 else 0.0,
            "samples": samples,
        }
        if active:   # ReGLU experts in decode
            row["active_neurons"] = statistics.mean(active)
        if stats:
            row["experts"] = {k: statistics.mean(s[k] for s in stats) for k in stats[0]}
            if "read_bound_tps" in row["experts"]:
                row["experts"]["of_read_bound"] = (row["tps_mean"] /
                                                   row["experts"]["read_bound_tps"])
        results.append(row)
    g = llm.gguf
    breakdown = decode_breakdown(llm, depth, min(32, n_gen), tokens) if n_gen > 0 else None
    out = {
        "model": g.path,
        "arch": g.arch,
        "size_bytes": g.file_size,
        "n_params": sum(t.n_elements for t in g.tensors.values()),
        "backend": llm.device,
        "threads": kernels.get_threads(),
        "load_s": llm.load_s,
        "startup": first,
        "peak_rss_bytes": peak_rss(),
        "routing": routing,
        "results": results,
        "decode_breakdown": breakdown,
    }
    if streamed:
        out["memory_plan"] = llm.memory_plan.as_dict()
        out["policy"] = experts.policy_name
        out["direct_io"] = experts.store.direct
    return out


def _steps(trace) -> list:
    """A routing trace (layer, ids) per routing call, as the cache's steps: one per call."""
    return [(layer, np.unique(ids)) for layer, ids in trace]


def format_table(r: dict) -> str:
    """A llama-bench style table."""
    import os
    head = "| model | size | params | backend | threads | test | t/s |"
    sep = "| --- | ---: | ---: | --- | ---: | ---: | ---: |"
    rows = [head, sep]
    name = f"{r['arch']} {os.path.basename(r['model'])}"
    for t in r["results"]:
        rows.append(f"| {name} | {r['size_bytes'] / 2**20:.2f} MiB | {r['n_params'] / 1e6:.2f} M "
                    f"| {r['backend']} | {r['threads']} | {t['test']} "
                    f"| {t['tps_mean']:.2f} ± {t['tps_sd']:.2f} |")
    for t in r["results"]:
        if "active_neurons" in t:
            rows.append(f"{t['test']}: {t['active_neurons']:.1%} of expert neurons active "
                        f"(ReGLU rows computed)")
        e = t.get("experts")
        if e:
            rows.append(f"{t['test']}: expert hit rate {e['hit_rate_bytes']:.1%} of bytes, "
                        f"{e['bytes_read_per_token'] / 2**20:.1f} MiB read/token, "
                        f"{e['read_hidden']:.0%} of read time hidden, prediction precision "
                        f"{e['prediction_precision']:.2f} recall {e['prediction_recall']:.2f}"
                        + (f"; reads alone allow {e['read_bound_tps']:.2f} tok/s (this run "
                           f"{e['of_read_bound']:.0%} of it)" if "read_bound_tps" in e else ""))
    b = r.get("decode_breakdown")
    if b:
        rows.append(f"decode at depth {b['depth']}: {b['ms_per_token']:.2f} ms/token = " +
                    ", ".join(f"{k} {v:.2f}" for k, v in b["ms"].items()))
    if "policy" in r:
        plan = r["memory_plan"]
        rows.append(f"memory budget {plan['budget'] / 2**20:.0f} MiB: {plan['n_slots']} of "
                    f"{plan['n_experts']} experts cached ({r['policy']}, routing "
                    f"{r['routing']}, {'O_DIRECT' if r['direct_io'] else 'buffered'} reads)")
    st = r["startup"]
    rows.append(f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB, load {r['load_s']:.2f} s "
                f"(compiling {st['compile_s']:.2f} s, {st['kernel_cache']} kernel cache)"
                + (f", first token {st['process_to_first_token_s']:.2f} s after start"
                   if "first_token_s" in st else ""))
    return "\n".join(rows)
