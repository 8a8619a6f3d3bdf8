"""Kernel benchmark: matvec weight-streaming bandwidth (GB/s) and prefill matmul GFLOP/s.

Matvec cycles through enough distinct copies of each matrix that the working set is several
times the last-level cache, so the weights genuinely come from DRAM, as in decode.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

WORKING_SET = 256 << 20    # bytes of distinct weights cycled by matvec (>> 32 MiB L3)
K_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _weights(qtype: str, rows: int, cols: int, rng) -> np.ndarray:
    """Random raw blocks (rows, row_bytes): gguf-py quantization where it exists, else random
    bytes with sane scale fields."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
    from gguf import quants as gq
    if qtype in K_SCALES:
        bs = GGML_QUANT_SIZES[T[qtype]][1]
        data = rng.integers(0, 256, (rows, cols // 256, bs), dtype=np.uint8)
        for off in K_SCALES[qtype]:
            data[..., off:off + 2] = rng.uniform(1e-3, 1e-2, (rows, cols // 256, 1)).astype(np.float16).view(np.uint8)
        return data.reshape(rows, -1)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    return np.ascontiguousarray(gq.quantize(w, T[qtype]).view(np.uint8).reshape(rows, -1))


def _l3_bytes() -> int | None:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            s = f.read().strip()
        return int(s[:-1]) << (10 if s.endswith("K") else 20) if s[-1] in "KM" else int(s)
    except (OSError, ValueError):
        return None


def bench_kernels(threads=(1, 2), types=("Q4_0", "Q4_1", "Q8_0", "Q4_K"),
                  shapes=((576, 1536), (1536, 576), (1536, 1536)), repeats=5,
                  matmul_tokens=512, working_set=WORKING_SET) -> dict:
    """Measure matvec GB/s (weights from DRAM) per thread count, matmul GFLOP/s at
    ``matmul_tokens`` activation rows (default BLAS path and integer path), and the time the
    first kernel call took (JIT compile, or loading Numba's disk cache)."""
    t0 = time.perf_counter()
    import pocketlm.kernels as K
    from pocketlm.gguf.tensor import QTensor
    compile_s = K.warmup(tuple(types))
    compile_s_total = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    res = {"compile_s": compile_s, "import_and_compile_s": compile_s_total,
           "working_set_bytes": working_set, "l3_bytes": _l3_bytes(),
           "numba_cache_dir": os.environ.get("NUMBA_CACHE_DIR"), "matvec": [], "matmul": []}
    before = K.get_threads()
    try:
        for qtype in types:
            block = 256 if qtype.endswith("_K") else 32
            for rows, cols in shapes:
                if cols % block:
                    res.setdefault("skipped", []).append(f"{qtype} {rows}x{cols}: cols not a multiple of {block}")
                    continue
                base = _weights(qtype, rows, cols, rng)
                copies = max(2, -(-working_set // base.nbytes))
                # whole weights, as models call them (prepared on first use, like a model's)
                mats = [QTensor(qtype, (rows, cols), base.copy()) for _ in range(copies)]
                x = rng.standard_normal(cols).astype(np.float32)
                out = np.empty(rows, np.float32)
                for m in mats:
                    K.matvec(m, x, out)
                for th in threads:
                    K.set_threads(th)
                    best = float("inf")
                    for _ in range(repeats):
                        t = time.perf_counter()
                        for m in mats:
                            K.matvec(m, x, out)
                        best = min(best, time.perf_counter() - t)
                    res["matvec"].append({"type": qtype, "rows": rows, "cols": cols, "threads": th,
                                          "gbps": copies * base.nbytes / best / 1e9,
                                          "us_per_call": best / copies * 1e6})
                xs = rng.standard_normal((matmul_tokens, cols)).astype(np.float32)
                o2 = np.empty((matmul_tokens, rows), np.float32)
                flops = 2.0 * rows * cols * matmul_tokens
                K.set_threads(max(threads))
                for method in ("auto", "quant"):
                    K.matmul_raw(qtype, base, cols, xs[:8], o2[:8], method)
                    best = float("inf")
                    for _ in range(max(1, repeats // 2)):
                        t = time.perf_counter()
                        K.matmul_raw(qtype, base, cols, xs, o2, method)
                        best = min(best, time.perf_counter() - t)
                    res["matmul"].append({"type": qtype, "rows": rows, "cols": cols,
                                          "tokens": matmul_tokens, "threads": max(threads),
                                          "method": "blas" if method == "auto" else method,
                                          "gflops": flops / best / 1e9, "ms": best * 1e3})
    finally:
        K.set_threads(before)
    return res


def _table(res: dict) -> str:
    l3 = res["l3_bytes"]
    lines = [f"first kernel call (compile or cache load): {res['compile_s']:.2f} s",
             f"matvec cycles {res['working_set_bytes'] >> 20} MiB of distinct weights"
             + (f" (L3 {l3 >> 20} MiB): weights stream from DRAM" if l3 else ""),
             "", "| type | rows x cols | threads | GB/s | us/call |", "|---|---|---|---|---|"]
    for r in res["matvec"]:
        lines.append(f"| {r['type']} | {r['rows']}x{r['cols']} | {r['threads']} | "
                     f"{r['gbps']:.2f} | {r['us_per_call']:.1f} |")
    lines += ["", "| type | rows x cols | tokens | threads | method | GFLOP/s | ms |",
              "|---|---|---|---|---|---|---|"]
    for r in res["matmul"]:
        lines.append(f"| {r['type']} | {r['rows']}x{r['cols']} | {r['tokens']} | {r['threads']} | "
                     f"{r['method']} | {r['gflops']:.1f} | {r['ms']:.1f} |")
    lines += [f"skipped: {s}" for s in res.get("skipped", [])]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--types", default="Q4_0,Q4_1,Q8_0,Q4_K")
    p.add_argument("--shapes", default="576x1536,1536x576,1536x1536")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokens", type=int, default=512, help="activation rows for matmul")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = p.parse_args(argv)
    res = bench_kernels(threads=tuple(int(t) for t in a.threads.split(",")),
                        types=tuple(a.types.split(",")),
                        shapes=tuple(tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")),
                        repeats=a.repeats, matmul_tokens=a.tokens)
    print(json.dumps(res, indent=1) if a.json else _table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
