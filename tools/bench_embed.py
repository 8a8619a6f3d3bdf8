"""Sentence-embedding throughput: sentences/s at fixed batch sizes and sequence length.

Inputs are distinct random sequences of ``n_tokens`` ids (first and last: the model's
[CLS]/[SEP]), so no padding is involved. One warm-up call per batch size (compiles or loads
the kernels), then ``reps`` timed trials; the figure is sentences / median trial time.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from pocketlm import kernels
from pocketlm.generate.loop import peak_rss


def _inputs(llm, n: int, n_tokens: int, seed: int) -> list[list[int]]:
    ends = llm.tokenize("", add_special=True, parse_special=True)   # [CLS], [SEP]
    if len(ends) != 2:
        raise ValueError("embedding benchmark expects a tokenizer adding two special tokens")
    n_vocab = llm.tokenizer.n_vocab
    rng = np.random.default_rng(seed)
    lo = min(1000, n_vocab // 2)   # past BERT's special and unused ids
    body = rng.integers(lo, n_vocab, size=(n, n_tokens - 2)).tolist()
    return [[ends[0], *b, ends[1]] for b in body]


def bench_embed(llm, batch_sizes=(1, 32), n_tokens: int = 128, reps: int = 5,
                progress=None) -> dict:
    """Embedding speed of a loaded encoder ``runtime.LLM``; a JSON-friendly dict."""
    if n_tokens < 2:
        raise ValueError("n_tokens must be at least 2 ([CLS] and [SEP])")
    results = []
    for b in batch_sizes:
        per_trial = max(64, 4 * b)   # as the sentence-transformers reference: 64 or 4 batches
        data = _inputs(llm, per_trial, n_tokens, b)
        llm.embed(data[:b], batch_size=b)
        times = []
        for r in range(reps):
            t0 = time.perf_counter()
            llm.embed(data, batch_size=b)
            times.append(time.perf_counter() - t0)
            if progress:
                progress(f"batch {b}", r + 1, reps)
        med = statistics.median(times)
        results.append({"batch_size": b, "n_tokens": n_tokens, "sentences_per_trial": per_trial,
                        "sentences_per_s_median": per_trial / med,
                        "ms_per_batch_median": 1000 * med * b / per_trial,
                        "trial_seconds": times})
    g = llm.gguf
    return {"model": g.path, "arch": g.arch, "size_bytes": g.file_size,
            "backend": llm.model.ops.name, "threads": kernels.get_threads(),
            "load_s": llm.load_s, "peak_rss_bytes": peak_rss(), "results": results}


def format_embed_table(r: dict) -> str:
    import os
    rows = ["| model | size | backend | threads | batch | tokens | sentences/s |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    name = f"{r['arch']} {os.path.basename(r['model'])}"
    for t in r["results"]:
        rows.append(f"| {name} | {r['size_bytes'] / 2**20:.2f} MiB | {r['backend']} "
                    f"| {r['threads']} | {t['batch_size']} | {t['n_tokens']} "
                    f"| {t['sentences_per_s_median']:.2f} |")
    rows.append(f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB, load {r['load_s']:.2f} s")
    return "\n".join(rows)
