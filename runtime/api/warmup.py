"""Compile a decoder's kernels before its first token, on every core.

Numba compiles a kernel on its first call. With an empty kernel cache that stalls the first
prompt, and again the first decoded token, for as long as the model's weight types take (about
15 s on 2 cores for Qwen2.5's four). ``start`` runs the model's two paths once each in a worker
process of its own, at the same time as the loading process reads the model, so that the
compiling is spread over the cores and lands in Numba's disk cache; the loading process then
reads every kernel from that cache. A marker per architecture and set of weight types in the
cache folder (which is named after the kernels' sources) skips the workers once they have
succeeded; a worker that fails
costs nothing but the time, since every kernel still compiles on first use.
``POCKETLM_PRECOMPILE=0`` turns the workers off (kernels then compile on first use).

Run as ``python -m pocketlm.api.warmup MODEL.gguf PATH CONFIG_JSON`` (what ``start`` does).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PATHS = ("prompt", "decode")


def _marker(g) -> Path:
    """What the kernels compiled for a model depend on: its architecture and weight types
    (any file sharing them, a copy or a requantized twin, needs nothing more)."""
    import numba

    from pocketlm import kernels  # noqa: F401  (sets Numba's cache folder)
    kinds = sorted({t.qtype for t in g.tensors.values()})
    key = hashlib.sha256(f"{g.arch}\0{' '.join(kinds)}".encode())
    return Path(numba.config.CACHE_DIR) / f"warm-{key.hexdigest()[:16]}"


class Workers:
    """The running workers of ``start``; ``wait`` reports them as the stage "compile"."""

    def __init__(self, procs: list[subprocess.Popen], marker: Path):
        self.procs, self.marker = procs, marker

    def wait(self, progress=None) -> float:
        """Wait for the workers; returns the seconds waited."""
        t0 = time.perf_counter()
        ok = 0
        for i, p in enumerate(self.procs):
            if progress:
                progress("compile", i, len(self.procs))
            ok += p.wait() == 0
        if progress:
            progress("compile", len(self.procs), len(self.procs))
        if ok == len(self.procs):
            try:
                self.marker.parent.mkdir(parents=True, exist_ok=True)
                self.marker.touch()
            except OSError:   # a read-only cache: the workers simply run again next time
                pass
        return time.perf_counter() - t0

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def start(g, config) -> Workers | None:
    """Start the workers for the open model file ``g`` loaded with ``config`` (a LoadConfig),
    unless the kernel cache already holds its kernels. None when nothing needs compiling."""
    path = g.path
    marker = _marker(g)
    if marker.exists() or os.environ.get("POCKETLM_PRECOMPILE", "1") == "0":
        return None
    settings = json.dumps({"n_ctx": config.n_ctx, "chunk": config.chunk,
                           "sparse_attention": config.sparse_attention,
                           "memory_budget": config.memory_budget,
                           "expert_policy": config.expert_policy,
                           "numerics": config.numerics})
    # one kernel thread each: the workers only need every kernel called once
    env = {**os.environ, "NUMBA_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "pocketlm.api.warmup", str(path), part,
                               settings], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for part in PATHS]
    return Workers(procs, marker)


def exercise(model, part: str, n_ctx: int, chunk: int) -> None:
    """Call the kernels of the model's ``part`` once, on a scratch cache: "prompt" is a prompt
    long enough for BLAS, then prompts of one and a few tokens (one token takes the one-row
    paths, such as an expert's active rows); "decode" a decoded token. The split keeps the
    two workers' compiling about equal (about 7 s each on one core for Qwen2.5) and apart:
    the kernels both paths call (norms, rope, softmax) come first in the prompt and late in
    decode, by when the prompt worker has put them in the cache."""
    def run(n, ops):
        cache = model.new_cache(min(n_ctx, 16), chunk)
        ids = np.arange(n, dtype=np.int64) % model.args.n_vocab
        model.forward(ids, np.arange(n, dtype=np.int64), cache, n_logits=1, ops=ops)

    if part == "prompt":
        run(16, model.ops.prompt)
        run(1, model.ops.prompt)
        run(3, model.ops.prompt)
    else:
        run(1, model.ops)


def _main(argv: list[str]) -> int:
    path, part, settings = argv
    from pocketlm.api.config import LoadConfig
    from pocketlm.api.build import build_model
    from pocketlm.gguf.reader import open_gguf
    c = LoadConfig(**json.loads(settings), threads=1)
    with open_gguf(path) as g:
        m, n_ctx, _ = build_model(g, c, "cpu")
        if m.capabilities.generate:
            exercise(m, part, n_ctx, c.chunk)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
