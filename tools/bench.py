"""Model benchmark in llama-bench's terms: pp<N> (prefill) and tg<N> (decode) in tokens/s.

tg is measured after a prompt of ``depth`` tokens (llama-bench's ``-d``), so decode pays for
attention over a realistic cache. Each test runs ``reps`` times after one warm-up; mean ± sd.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from runtime import kernels
from runtime.generate import peak_rss, prefill


def _random_tokens(n_vocab: int, n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(100, n_vocab - 1, size=n).tolist()


def bench_model(llm, n_prompt: int = 512, n_gen: int = 128, depth: int = 512, reps: int = 5,
                progress=None) -> dict:
    """Prefill and decode speed of a loaded ``runtime.LLM``; a JSON-friendly dict."""
    model, n_vocab = llm.model, llm.tokenizer.n_vocab
    results = []
    tests = []
    if n_prompt > 0:
        tests.append(("pp", n_prompt))
    if n_gen > 0:
        tests.append(("tg", n_gen))
    for kind, n in tests:
        samples = []
        for r in range(reps + 1):  # the first run warms caches and JIT
            if kind == "pp":
                ids = _random_tokens(n_vocab, n, r)
                cache = model.new_cache(n, llm.chunk)
                t0 = time.perf_counter()
                prefill(model, cache, ids, llm.chunk)
                dt = time.perf_counter() - t0
            else:
                ids = _random_tokens(n_vocab, depth + 1, r)
                cache = model.new_cache(depth + n + 1, llm.chunk)
                if depth:
                    prefill(model, cache, ids[:depth], llm.chunk)
                tok = ids[depth]
                t0 = time.perf_counter()
                for _ in range(n):
                    pos = np.array([cache.n_past], dtype=np.int64)
                    logits = model.forward(np.array([tok], dtype=np.int64), pos, cache)
                    cache.n_past += 1
                    tok = int(np.argmax(logits[-1]))
                dt = time.perf_counter() - t0
            if r > 0:
                samples.append(n / dt)
            if progress:
                progress(f"{kind}{n}", r, reps)
        name = f"{kind}{n}" + (f" @ d{depth}" if kind == "tg" and depth else "")
        results.append({
            "test": name, "n_tokens": n, "depth": depth if kind == "tg" else 0,
            "tps_mean": statistics.mean(samples),
            "tps_sd": statistics.stdev(samples) if len(samples) > 1 else 0.0,
            "samples": samples,
        })
    g = llm.gguf
    return {
        "model": g.path,
        "arch": g.arch,
        "size_bytes": g.file_size,
        "n_params": sum(t.n_elements for t in g.tensors.values()),
        "backend": "cpu",
        "threads": kernels.get_threads(),
        "load_s": llm.load_s,
        "peak_rss_bytes": peak_rss(),
        "results": results,
    }


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
    rows.append(f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB, load {r['load_s']:.2f} s")
    return "\n".join(rows)
