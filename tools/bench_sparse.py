"""Decode speed at long context, dense vs InfLLM v2 block-sparse attention.

Filling a cache by prefill at 32k tokens costs minutes on a small CPU and does not change the
cost of a decode step, so each layer's cache is filled directly with random keys and values
(unit normal) at positions ``0..depth-1``. Then ``-n`` tokens are decoded, one at a time, with
attention dense and then sparse; one step before the timed ones builds the compressed keys
(a one-off cost on switching to sparse, reported as ``switch_s``). Besides wall time it reports
the process CPU time per token, which on a busy machine with ``-t 1`` measures the work done.

    python -m tools.bench_sparse MODEL [-d 4096 16384 32768] [-n 4] [--json]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def fill(cache, depth: int, seed: int = 0):
    """Random keys and values at positions [0, depth) of every layer."""
    rng = np.random.default_rng(seed)
    for layer in cache.layers:
        kvh, d, _ = layer.kt.shape
        layer.kt[:, :, :depth] = rng.standard_normal((kvh, d, depth), dtype=np.float32)
        layer.v[:depth] = rng.standard_normal((depth, kvh, d), dtype=np.float32)
        layer.slot_pos[:depth] = np.arange(depth)
        layer.n_slots = depth
    cache.n_past = depth
    cache.tokens = [0] * depth


def decode_speed(model, depth: int, n: int, mode: str, n_ctx: int) -> dict:
    model.configure(n_ctx=n_ctx, sparse_attention=mode)
    cache = model.new_cache(depth + n + 1, 1)
    fill(cache, depth)
    tok = np.array([5])
    wall, cpu = [], []
    for i in range(n + 1):
        pos = np.array([cache.n_past])
        t0, c0 = time.perf_counter(), time.process_time()
        model.forward(tok, pos, cache)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        cache.n_past += 1
    step, cstep = float(np.median(wall[1:])), float(np.median(cpu[1:]))
    return {"depth": depth, "mode": mode, "tokens": n, "ms_per_token": step * 1e3,
            "tok_s": 1.0 / step, "cpu_ms_per_token": cstep * 1e3,
            "switch_s": wall[0] - step}


def main(argv=None):
    from pocketlm import LLM
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("-d", "--depths", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("-n", "--n-gen", type=int, default=4)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    n_ctx = max(a.depths) + a.n_gen + 1
    rows = []
    with LLM.load(a.model, n_ctx=n_ctx, threads=a.threads) as llm:
        if not llm.model.capabilities.sparse_attention:
            raise SystemExit(f"{a.model}: this architecture has no sparse attention")
        llm.cache = None   # the benchmark makes its own caches
        decode_speed(llm.model, 128, 1, "off", n_ctx)   # compile / warm up
        decode_speed(llm.model, 8192, 1, "on", n_ctx)
        for d in a.depths:
            for mode in ("off", "on"):
                r = decode_speed(llm.model, d, a.n_gen, mode, n_ctx)
                rows.append(r)
                if not a.json:
                    print(f"depth {d:6d}  {'dense ' if mode == 'off' else 'sparse'}  "
                          f"{r['tok_s']:7.2f} tok/s  {r['ms_per_token']:8.1f} ms/token  "
                          f"cpu {r['cpu_ms_per_token']:8.1f} ms/token  "
                          f"(switch {r['switch_s']:.2f} s)", flush=True)
    if a.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
