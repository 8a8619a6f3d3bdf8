"""The `pocketlm` console script: one entry point, one subcommand per job.

Library code reports progress by callback; only this module prints. Every failure the user can
cause (unknown model, broken file, bad argument) ends in a one-line error and exit code 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 1."""


def _progress_printer(label: str):
    """A progress callback drawing one updating line on stderr (only when it is a terminal)."""
    tty = sys.stderr.isatty()
    last = [0.0]

    def report(stage: str, done: int, total: int):
        now = time.monotonic()
        if not tty or (now - last[0] < 0.1 and done < total):
            return
        last[0] = now
        if total and total > 1 << 20:
            msg = f"{label}: {stage} {done / 2**20:7.1f} / {total / 2**20:.1f} MiB"
        else:
            msg = f"{label}: {stage} {done}/{total}"
        sys.stderr.write("\r\033[K" + msg)
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return report


# -- model store --------------------------------------------------------------------------------
def cmd_pull(args):
    from runtime import store
    for name in args.names:
        path = store.pull(name, progress=_progress_printer(name), force=args.force)
        print(f"{name}: {path}")


def cmd_list(args):
    from runtime import store
    rows = store.list_models()
    if args.json:
        print(json.dumps([{"name": n, "path": str(p), "size": s} for n, p, s in rows], indent=2))
        return
    print(f"models in {store.models_dir()}")
    if not rows:
        print("  (none; try: pocketlm pull smollm2-135m)")
    for name, path, size in rows:
        print(f"  {name:<16} {size / 2**20:8.1f} MiB  {path}")
    missing = [n for n in store.REGISTRY if n not in {r[0] for r in rows}]
    if missing:
        print("available to pull: " + ", ".join(missing))


def cmd_rm(args):
    from runtime import store
    for name in args.names:
        print(f"removed {store.remove(name)}")


def cmd_inspect(args):
    from runtime import store
    from runtime.gguf import open_gguf
    from runtime.summary import format_summary, summarize
    path = store.resolve(args.model, pull_missing=args.pull,
                         progress=_progress_printer(args.model))
    with open_gguf(path) as g:
        s = summarize(g)
    print(json.dumps(s, indent=2) if args.json else format_summary(s))


# -- quantization ------------------------------------------------------------------------------
def cmd_quantize(args):
    from quant.requantize import requantize
    from runtime import store
    src = store.resolve(args.input)
    if os.path.abspath(src) == os.path.abspath(args.output):
        raise CLIError("output must differ from input")
    report = _progress_printer("quantize")
    info = requantize(src, args.output, args.type.upper(),
                      progress=lambda d, t: report("tensors", d, t))
    print(f"wrote {args.output}" + (f" ({info})" if info else ""))


# -- benchmarks --------------------------------------------------------------------------------
def cmd_bench(args):
    if args.kernels:
        from tools.bench_kernels import main as bench_kernels_main
        argv = ["--json"] if args.json else []
        if args.threads:
            argv += ["--threads", *[str(t) for t in args.threads]]
        return bench_kernels_main(argv)
    raise CLIError("model benchmarks are not available yet; use: pocketlm bench --kernels")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pocketlm",
        description="On-device LLM runtime. MODEL is a name from the store "
                    "(see `pocketlm list`) or a path to a .gguf file.")
    p.add_argument("--version", action="version", version="pocketlm 0.1.0")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("pull", help="fetch a model into the store ($POCKETLM_HOME)")
    s.add_argument("names", nargs="+", metavar="NAME")
    s.add_argument("--force", action="store_true", help="fetch again even if present")
    s.set_defaults(func=cmd_pull)

    s = sub.add_parser("list", help="list models in the store")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("rm", help="remove models from the store")
    s.add_argument("names", nargs="+", metavar="NAME")
    s.set_defaults(func=cmd_rm)

    s = sub.add_parser("inspect", help="show a model's architecture, tensors and hyper-parameters")
    s.add_argument("model", metavar="MODEL")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--pull", action="store_true", help="pull the model first if it is missing")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("quantize", help="convert a GGUF to another quantization type")
    s.add_argument("input", metavar="IN", help="model name or input .gguf")
    s.add_argument("output", metavar="OUT", help="output .gguf path")
    s.add_argument("type", metavar="TYPE", help="Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("bench", help="benchmarks (llama-bench style)")
    s.add_argument("--kernels", action="store_true",
                   help="benchmark the quantized matvec/matmul kernels")
    s.add_argument("--threads", type=int, nargs="+", help="thread counts to measure")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from runtime.gguf import GGUFError
    from runtime.store import StoreError
    try:
        rc = args.func(args)
    except (CLIError, GGUFError, StoreError, ValueError, OSError) as e:
        print(f"pocketlm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pocketlm: interrupted", file=sys.stderr)
        return 130
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
