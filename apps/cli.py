"""The `pocketlm` console script: one entry point, one subcommand per job.

Library code reports progress by callback; only this module prints. Every failure the user can
cause (unknown model, broken file, bad argument) ends in a one-line error and exit code 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from pocketlm.api.store import DEFAULT_MODEL


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 1."""


class _Progress:
    """A progress callback drawing rich progress bars on stderr, one per stage (download,
    extract, load, compile…); silent when stderr is not a terminal (logs, pipes, tests).
    Bars leave the screen once all their stages finish, and at ``close()`` (or the end of a
    ``with`` block) whatever happened: the screen a prompt or an answer appears on is clean."""

    def __init__(self, label: str):
        self.label = os.path.basename(label)  # a model path shows as its file name
        self.bars, self.tasks = None, {}
        self.on = sys.stderr.isatty()

    def __call__(self, stage: str, done: int, total: int):
        if not self.on:
            return
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        if self.bars is None:
            self.bars = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.fields[amount]}"), TimeElapsedColumn(),
                                 console=Console(stderr=True), transient=True)
            self.bars.start()
        if stage not in self.tasks:
            self.tasks[stage] = self.bars.add_task(f"{self.label}: {stage}", total=total,
                                                   amount="")
        amount = (f"{done / 2**20:.1f}/{total / 2**20:.1f} MiB" if total > 1 << 20
                  else f"{done}/{total}")
        self.bars.update(self.tasks[stage], completed=done, total=total, amount=amount)
        if all(t.finished for t in self.bars.tasks):  # the next stage, if any, starts a new set
            self.close()

    def close(self):
        if self.bars is not None:
            self.bars.stop()
        self.bars, self.tasks = None, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- model store --------------------------------------------------------------------------------
def cmd_pull(args):
    from pocketlm.api import store
    for name in args.names:
        with _Progress(name) as report:
            path = store.pull(name, progress=report, force=args.force)
        print(f"{name}: {path}")


def cmd_list(args):
    from pocketlm.api import store
    rows = store.list_models()
    if args.json:
        print(json.dumps([{"name": n, "path": str(p), "size": s} for n, p, s in rows], indent=2))
        return
    print(f"models in {store.models_dir()}")
    if not rows:
        print(f"  (none; try: pocketlm pull {DEFAULT_MODEL})")
    for name, path, size in rows:
        print(f"  {name:<16} {size / 2**20:8.1f} MiB  {path}")
    missing = [n for n in store.REGISTRY if n not in {r[0] for r in rows}]
    if missing:
        print("available to pull: " + ", ".join(missing))


def cmd_rm(args):
    from pocketlm.api import store
    for name in args.names:
        print(f"removed {store.remove(name)}")


def cmd_inspect(args):
    from pocketlm.api import store
    from pocketlm.gguf.reader import open_gguf
    from pocketlm.gguf.summary import format_summary, summarize
    with _Progress(args.model) as report:
        path = store.resolve(args.model, pull_missing=args.pull, progress=report)
    with open_gguf(path) as g:
        s = summarize(g)
        mem = _memory(g, args) if args.memory else None
    if mem is None:
        print(json.dumps(s, indent=2) if args.json else format_summary(s))
        return
    from pocketlm.api.memory import format_report
    s["memory"] = mem.as_dict()
    print(json.dumps(s, indent=2) if args.json else format_summary(s) + "\n" + format_report(mem))


def _memory(g, args):
    """Paper-style memory figures (runtime.memory), checked against --max-memory."""
    from pocketlm.models import load_model
    from pocketlm.experts.budget import parse_size
    from pocketlm.api.memory import account, check
    seq = args.seq_len or int(g.get("{arch}.context_length", 0))
    mem = account(g, load_model(g), seq)
    if args.max_memory:
        check(mem, parse_size(args.max_memory), f"{args.model} at {seq} tokens")
    return mem


# -- encoders ----------------------------------------------------------------------------------
def cmd_classify(args):
    items = args.texts
    if args.ids:
        try:
            items = [[int(t) for t in x.split()] for x in args.texts]
        except ValueError:
            raise CLIError("--ids: each TEXT must be whitespace-separated token ids") from None
    with _load(args) as llm:
        labels, probs = llm.classify(items)
    if args.json:
        print(json.dumps([{"label": lab, "probs": p.tolist()} for lab, p in zip(labels, probs)]))
        return
    for lab, p, x in zip(labels, probs, args.texts):
        print(f"{lab}\t{p.max():.4f}\t{x}")


def cmd_embed(args):
    with _load(args) as llm:
        vecs = llm.embed(args.texts, batch_size=args.batch_size)
    if args.json:
        print(json.dumps([v.tolist() for v in vecs]))
        return
    for v, x in zip(vecs, args.texts):
        print(" ".join(f"{a:.6f}" for a in v[:8]) + f" ... ({len(v)} dims)\t{x}")


# -- quantization ------------------------------------------------------------------------------
def cmd_convert(args):
    if args.arch == "embbert":
        return _convert_embbert(args)
    if args.type == "int8" or args.labels or args.tokenizer or args.cls_prefix:
        raise CLIError("--type int8, --labels, --tokenizer and --cls-prefix need --arch embbert")
    from pocketlm.quant.convert import convert
    with _Progress("convert") as report:
        info = convert(args.hf_dir, args.output, args.type,
                       progress=lambda d, t: report("tensors", d, t))
    print(f"wrote {info['path']}: {info['qtype']}, {info['size_bytes'] / 2**20:.1f} MiB, "
          f"{info['n_tensors']} tensors")


def _convert_embbert(args):
    from pocketlm.tools.convert_embbert import convert
    if args.type not in ("f32", "f16", "int8"):
        raise CLIError(f"--arch embbert converts to f32, f16 or int8, not {args.type}")
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    info = convert(args.hf_dir, args.output, args.type, labels=labels, tokenizer=args.tokenizer,
                   cls_prefix=args.cls_prefix)
    print(f"wrote {info['path']}: embbert {info['type']}, {info['n_params']:,} parameters, "
          f"{info['n_layer']} layers, {info['n_labels']} labels")


def cmd_quantize(args):
    from pocketlm.quant.requantize import requantize
    from pocketlm.api import store
    src = store.resolve(args.input)
    if os.path.abspath(src) == os.path.abspath(args.output):
        raise CLIError("output must differ from input")
    with _Progress("quantize") as report:
        info = requantize(src, args.output, args.type.upper(),
                          progress=lambda d, t: report("tensors", d, t))
    print(f"wrote {info['path']}: {info['ftype']}, {info['size_bytes'] / 2**20:.1f} MiB, "
          f"{info['n_requantized']} tensors converted, {info['n_copied']} copied")


# -- generation --------------------------------------------------------------------------------
def _env(name: str, default, cast=str):
    v = os.environ.get(f"POCKETLM_{name}")
    if v is None or v == "":
        return default
    try:
        return cast(v)
    except ValueError:
        raise SystemExit(f"pocketlm: error: POCKETLM_{name}={v!r} is not a valid {cast.__name__}")


def add_model_flags(s: argparse.ArgumentParser):
    s.add_argument("-c", "--ctx-size", type=int, default=_env("CTX_SIZE", None, int),
                   help="context size in tokens (default: the model's, capped at 4096) "
                        "[POCKETLM_CTX_SIZE]")
    s.add_argument("-t", "--threads", type=int, default=_env("THREADS", None, int),
                   help="CPU threads (default: all cores) [POCKETLM_THREADS]")
    s.add_argument("--verbose", action="store_true",
                   help="print load time, prompt and generation tok/s and peak memory")
    add_sparse_flag(s)
    add_budget_flags(s)
    add_device_flags(s)
    s.add_argument("--numerics", choices=("auto", "llama", "exact"),
                   default=_env("NUMERICS", "auto"),
                   help="CPU arithmetic: auto (8-bit activations in decode as llama.cpp, float "
                        "prompts), llama (llama.cpp's arithmetic everywhere, F16 attention: "
                        "for comparing with its numbers) or exact (float throughout) "
                        "[POCKETLM_NUMERICS]")


def add_device_flags(s: argparse.ArgumentParser):
    s.add_argument("--device", choices=("cpu", "cuda", "auto"), default=_env("DEVICE", "cpu"),
                   help="where the model runs: cpu, cuda (an NVIDIA GPU through numba-cuda, "
                        "pip install 'pocketlm[cuda]') or auto (the GPU if usable, else the "
                        "CPU) [POCKETLM_DEVICE]")
    s.add_argument("--gpu-budget", default=_env("GPU_BUDGET", None), metavar="SIZE",
                   help="with --device cuda: GPU memory for MoE experts (e.g. 2G); the rest "
                        "stream from host memory; unset = all experts on the GPU "
                        "[POCKETLM_GPU_BUDGET]")


def add_budget_flags(s: argparse.ArgumentParser, policies=("lru", "lfu", "predictive")):
    s.add_argument("--memory-budget", default=_env("MEMORY_BUDGET", None), metavar="SIZE",
                   help="cap the whole process's memory (e.g. 1GiB, 1.5G, 800M); MoE experts "
                        "then stream from disk; unset = no cap, all experts mapped "
                        "[POCKETLM_MEMORY_BUDGET]")
    s.add_argument("--cache-policy", choices=policies, default=_env("CACHE_POLICY", "lru"),
                   help="expert cache eviction under --memory-budget (default lru) "
                        "[POCKETLM_CACHE_POLICY]")


def add_sparse_flag(s: argparse.ArgumentParser):
    s.add_argument("--sparse-attention", choices=("auto", "on", "off"),
                   default=_env("SPARSE_ATTENTION", "auto"),
                   help="block-sparse attention for models that have it (MiniCPM: InfLLM v2): "
                        "auto = from the model's switch length on, on = always, off = dense "
                        "[POCKETLM_SPARSE_ATTENTION]")


def add_max_memory_flag(s: argparse.ArgumentParser):
    s.add_argument("--max-memory", default=_env("MAX_MEMORY", None), metavar="SIZE",
                   help="device memory limit (e.g. 781kB, 2MB, 1MiB): refuse inputs whose "
                        "weights + activations exceed it [POCKETLM_MAX_MEMORY]")


def add_generation_flags(s: argparse.ArgumentParser):
    s.add_argument("-n", "--max-tokens", type=int, default=_env("MAX_TOKENS", None, int),
                   help="tokens to generate (default: until end of turn or a full context) "
                        "[POCKETLM_MAX_TOKENS]")
    s.add_argument("--temp", type=float, default=_env("TEMP", 0.8, float),
                   help="sampling temperature; 0 = greedy [POCKETLM_TEMP]")
    s.add_argument("--top-k", type=int, default=_env("TOP_K", 40, int),
                   help="keep the k most likely tokens; 0 disables [POCKETLM_TOP_K]")
    s.add_argument("--top-p", type=float, default=_env("TOP_P", 0.95, float),
                   help="nucleus sampling mass; 1.0 disables [POCKETLM_TOP_P]")
    s.add_argument("--min-p", type=float, default=_env("MIN_P", 0.05, float),
                   help="drop tokens below min_p x the top probability; 0 disables "
                        "[POCKETLM_MIN_P]")
    s.add_argument("--repeat-penalty", type=float, default=_env("REPEAT_PENALTY", 1.0, float),
                   help="penalty for recent tokens; 1.0 disables [POCKETLM_REPEAT_PENALTY]")
    s.add_argument("--seed", type=int, default=_env("SEED", None, int),
                   help="random seed for reproducible sampling [POCKETLM_SEED]")
    s.add_argument("--stop", action="append", default=None,
                   help="stop string (repeatable); never printed")
    s.add_argument("--system", default=_env("SYSTEM", None),
                   help="system prompt for chat [POCKETLM_SYSTEM]")


def _settings(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temp, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, repeat_penalty=args.repeat_penalty,
                seed=args.seed, stop=args.stop or [])


# LoadConfig field -> the flag's argparse name; each subcommand has some of these flags
_LOAD_FLAGS = {"n_ctx": "ctx_size", "threads": "threads", "memory_budget": "memory_budget",
               "expert_policy": "cache_policy", "sparse_attention": "sparse_attention",
               "backend": "backend", "max_memory": "max_memory", "device": "device",
               "gpu_budget": "gpu_budget", "numerics": "numerics"}


def _load_config(args):
    """The ``LoadConfig`` of the flags this subcommand has; a bad value or combination is a
    one-line ValueError."""
    from pocketlm import LoadConfig
    given = {f: getattr(args, a) for f, a in _LOAD_FLAGS.items() if hasattr(args, a)}
    if given.get("expert_policy") == "oracle":   # the benchmark sets it up from a traced pass
        given["expert_policy"] = "lru"
    return LoadConfig(**given)


def _load(args):
    from pocketlm import LLM
    with _Progress(args.model) as report:
        llm = LLM.load(args.model, _load_config(args), progress=report)
    if llm.device_note:
        print(f"pocketlm: {llm.device_note}", file=sys.stderr)
    return llm


def _print_stats(t):
    print(f"[load {t.load_s:.2f} s | prompt {t.prompt_tokens} tok, {t.prompt_tps:.1f} tok/s | "
          f"generation {t.generated_tokens} tok, {t.generation_tps:.1f} tok/s | "
          f"peak RSS {t.peak_rss_bytes / 2**20:.0f} MiB]", file=sys.stderr)


def _stream(chunks) -> object:
    last = None
    for c in chunks:
        if c.text:
            sys.stdout.write(c.text)
            sys.stdout.flush()
        last = c
    sys.stdout.write("\n")
    return last


def cmd_run(args):
    settings = _settings(args)
    with _load(args) as llm:
        if args.raw:
            chunks = llm.generate(args.prompt, stream=True, **settings)
        else:
            msgs = ([{"role": "system", "content": args.system}] if args.system else [])
            msgs.append({"role": "user", "content": args.prompt})
            chunks = llm.chat(msgs, stream=True, **settings)
        last = _stream(chunks)
        if args.verbose and last is not None:
            _print_stats(last.timings)


def cmd_chat(args):
    from pocketlm.apps.repl import chat_repl
    with _load(args) as llm:
        chat_repl(llm, _settings(args), system=args.system, verbose=args.verbose)


def _byte_size(text: str) -> int:
    from pocketlm.experts.budget import parse_size
    try:
        n = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"size {text!r} must be at least one byte")
    return n


def cmd_serve(args):
    from pocketlm.apps.server import serve
    from pocketlm.generate.loop import GenerationConfig
    settings = _settings(args)
    GenerationConfig().replace(**settings)  # a bad default is an error before binding
    with _Progress(args.model) as report:
        return serve(args.model, host=args.host, port=args.port, cors=args.cors,
                     max_body=args.max_body, alias=args.alias,
                     config=_load_config(args), progress=report,
                     settings=settings, system=args.system, verbose=args.verbose,
                     announce=lambda msg: print(f"pocketlm: {msg}", file=sys.stderr,
                                                flush=True))


def cmd_perplexity(args):
    from pocketlm.tools.perplexity import run
    return run(args)


def cmd_synth(args):
    from pocketlm.tools.synth import run
    with _Progress("synth") as report:
        return run(args, progress=lambda d, t: report("tensors", d, t))


# -- benchmarks --------------------------------------------------------------------------------
def cmd_bench(args):
    if args.kernels:
        from pocketlm.tools.bench_kernels import main as bench_kernels_main
        argv = ["--json"] if args.json else []
        if args.threads:
            argv += ["--threads", str(args.threads)]
        return bench_kernels_main(argv)
    if not args.model:
        raise CLIError("give a MODEL to benchmark, or --kernels")
    if args.schema is not None:
        from pocketlm.tools.bench_grammar import bench_grammar, format_grammar_table
        schema = None
        if args.schema:
            try:
                with open(args.schema, encoding="utf-8") as f:
                    schema = json.load(f)
            except (OSError, ValueError) as e:
                raise CLIError(f"--schema {args.schema}: {e}") from None
        with _load(args) as llm:
            r = bench_grammar(llm, schema, args.n_gen, args.repetitions)
        print(json.dumps(r, indent=2) if args.json else format_grammar_table(r))
        return
    if args.embed:
        from pocketlm.tools.bench_embed import bench_embed, format_embed_table
        try:
            sizes = [int(b) for b in args.batch_sizes.split(",")]
        except ValueError:
            raise CLIError(f"--batch-sizes {args.batch_sizes!r}: expected e.g. 1,32") from None
        with _load(args) as llm:
            r = bench_embed(llm, sizes, args.embed_tokens, args.repetitions)
        print(json.dumps(r, indent=2) if args.json else format_embed_table(r))
        return
    from pocketlm.tools.bench import bench_model, drop_page_cache, format_table
    text_ids = None
    if args.routing == "text" and not args.text:
        raise CLIError("--routing text needs --text FILE")
    if args.cold:
        from pocketlm.api import store
        drop_page_cache(store.resolve(args.model, pull_missing=False))
    if args.ctx_size is None:   # llama-bench sizes the context to the test (and a first chat)
        args.ctx_size = max(args.n_prompt, args.depth + args.n_gen + 1, 256)
    with _load(args) as llm:
        if args.routing == "text":
            with open(args.text, encoding="utf-8") as f:
                text_ids = llm.tokenize(f.read())
        r = bench_model(llm, args.n_prompt, args.n_gen, args.depth, args.repetitions,
                        routing=args.routing, text_ids=text_ids,
                        oracle=args.cache_policy == "oracle", io_replay=args.io_replay)
    print(json.dumps(r, indent=2) if args.json else format_table(r))


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
    s.add_argument("--memory", action="store_true",
                   help="weights + peak activations in bytes, as the EmbBERT-Q paper counts "
                        "them (tiny encoders)")
    s.add_argument("--seq-len", type=int, default=None,
                   help="tokens for --memory (default: the model's context length)")
    add_max_memory_flag(s)
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("classify", help="classify texts with an encoder classifier (EmbBERT-Q)")
    s.add_argument("model", metavar="MODEL")
    s.add_argument("texts", nargs="+", metavar="TEXT")
    s.add_argument("--ids", action="store_true",
                   help="each TEXT is whitespace-separated token ids, not text")
    s.add_argument("--backend", choices=("numba", "numpy"), default=_env("BACKEND", None),
                   help="numpy runs without any JIT compilation (default: numba) "
                        "[POCKETLM_BACKEND]")
    s.add_argument("-t", "--threads", type=int, default=_env("THREADS", None, int),
                   help="CPU threads (default: all cores) [POCKETLM_THREADS]")
    s.add_argument("--json", action="store_true", help="print JSON: label and probabilities")
    add_max_memory_flag(s)
    s.set_defaults(func=cmd_classify)

    s = sub.add_parser("embed", help="sentence embeddings with an encoder (all-minilm-l6-v2)")
    s.add_argument("model", metavar="MODEL")
    s.add_argument("texts", nargs="+", metavar="TEXT")
    s.add_argument("-b", "--batch-size", type=int, default=32, help="sequences per batch")
    s.add_argument("--backend", choices=("numba", "numpy"), default=_env("BACKEND", None),
                   help="numpy runs without any JIT compilation (default: numba) "
                        "[POCKETLM_BACKEND]")
    s.add_argument("-t", "--threads", type=int, default=_env("THREADS", None, int),
                   help="CPU threads (default: all cores) [POCKETLM_THREADS]")
    s.add_argument("--json", action="store_true", help="print the vectors as JSON")
    s.set_defaults(func=cmd_embed)

    s = sub.add_parser("convert", help="convert a Hugging Face BERT checkpoint to GGUF")
    s.add_argument("hf_dir", metavar="HF_DIR",
                   help="folder with config.json, *.safetensors, tokenizer.json or vocab.txt")
    s.add_argument("output", metavar="OUT", help="output .gguf path")
    s.add_argument("--type", default="f16", type=str.lower,
                   choices=("f32", "f16", "q8_0", "q4_0", "int8"),
                   help="weight type (default: f16); embbert: f32, f16 or int8")
    s.add_argument("--arch", choices=("bert", "embbert"), default="bert",
                   help="bert (Hugging Face BERT) or embbert (EmbBERT-Q in the authors' layout: "
                        "HF_DIR is model.safetensors or a folder with it, see docs/embbert.md)")
    s.add_argument("--labels", default=None,
                   help="embbert: comma-separated class names, one per classifier output")
    s.add_argument("--tokenizer", default=None,
                   help="embbert: HF tokenizers JSON to embed (default: HF_DIR/tokenizer.json)")
    s.add_argument("--cls-prefix", action="store_true",
                   help="embbert: prefix text inputs with [CLS]")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("quantize", help="convert a GGUF to another quantization type")
    s.add_argument("input", metavar="IN", help="model name or input .gguf")
    s.add_argument("output", metavar="OUT", help="output .gguf path")
    s.add_argument("type", metavar="TYPE", help="Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("run", help="answer one prompt and exit")
    s.add_argument("model", metavar="MODEL")
    s.add_argument("prompt", metavar="PROMPT")
    s.add_argument("--raw", action="store_true",
                   help="complete the prompt as plain text instead of as a chat message")
    add_model_flags(s)
    add_generation_flags(s)
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("chat", help=f"chat in the terminal (default model: {DEFAULT_MODEL})")
    s.add_argument("model", metavar="MODEL", nargs="?", default=_env("MODEL", DEFAULT_MODEL),
                   help="[POCKETLM_MODEL]")
    add_model_flags(s)
    add_generation_flags(s)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (see docs/server.md)")
    s.add_argument("model", metavar="MODEL", nargs="?", default=_env("MODEL", DEFAULT_MODEL),
                   help="[POCKETLM_MODEL]")
    s.add_argument("--host", default=_env("HOST", "127.0.0.1"),
                   help="address to listen on (default 127.0.0.1: this machine only; "
                        "0.0.0.0 exposes the server to the network) [POCKETLM_HOST]")
    s.add_argument("--port", type=int, default=_env("PORT", 8080, int),
                   help="port (default 8080; 0 picks a free one) [POCKETLM_PORT]")
    s.add_argument("--cors", action="append", default=None, metavar="ORIGIN",
                   help="let web pages from ORIGIN call the API (repeatable; '*' for any); "
                        "no CORS headers without it")
    s.add_argument("--max-body", type=_byte_size, default=_env("MAX_BODY", "8MiB"),
                   metavar="SIZE", help="largest request body, bytes or a size such as 16MiB "
                                        "(default 8MiB); larger ones get 413 [POCKETLM_MAX_BODY]")
    s.add_argument("--alias", default=_env("ALIAS", None), metavar="NAME",
                   help="the model name /v1/models lists and responses report (default: the "
                        "store name or the file's stem); requests may name any model "
                        "[POCKETLM_ALIAS]")
    add_model_flags(s)
    add_generation_flags(s)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("perplexity", help="perplexity of a text file (llama-perplexity method)")
    from pocketlm.tools.perplexity import add_arguments
    add_arguments(s)
    s.set_defaults(func=cmd_perplexity)

    s = sub.add_parser("synth", help="write a synthetic model (random weights at real shapes), "
                                     "or `synth stats MODEL`: MoE routing statistics")
    from pocketlm.tools.synth import add_arguments as add_synth_arguments
    add_synth_arguments(s)
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("bench", help="benchmarks (llama-bench style)")
    s.add_argument("model", metavar="MODEL", nargs="?")
    s.add_argument("-p", "--n-prompt", type=int, default=512, help="prefill test size (0: skip)")
    s.add_argument("-n", "--n-gen", type=int, default=128, help="decode test size (0: skip)")
    s.add_argument("-d", "--depth", type=int, default=512,
                   help="tokens already in the cache before the decode test")
    s.add_argument("-r", "--repetitions", type=int, default=5, help="runs per test")
    s.add_argument("--kernels", action="store_true",
                   help="benchmark the quantized matvec/matmul kernels instead of a model")
    s.add_argument("--embed", action="store_true",
                   help="sentence embeddings/s of an encoder instead of pp/tg")
    s.add_argument("--schema", nargs="?", const="", metavar="FILE",
                   help="constrained decoding instead of pp/tg: compile time of a JSON schema "
                        "(FILE, default a built-in 2 KB one) and the mask's cost per decoded "
                        "token over -n tokens")
    s.add_argument("--batch-sizes", default="1,32", help="--embed: batch sizes (default 1,32)")
    s.add_argument("--embed-tokens", type=int, default=128,
                   help="--embed: tokens per sentence, [CLS]/[SEP] included (default 128)")
    s.add_argument("--backend", choices=("numba", "numpy"), default=_env("BACKEND", None),
                   help="--embed: numpy runs without any JIT (default: numba) [POCKETLM_BACKEND]")
    s.add_argument("-c", "--ctx-size", type=int, default=None, help=argparse.SUPPRESS)
    s.add_argument("-t", "--threads", type=int, default=None, help="CPU threads")
    add_sparse_flag(s)
    add_budget_flags(s, ("lru", "lfu", "predictive", "oracle"))
    add_device_flags(s)
    s.add_argument("--cold", action="store_true",
                   help="drop the model file from the page cache before loading")
    s.add_argument("--io-replay", action="store_true",
                   help="with a memory budget: replay each decode run's expert reads with no "
                        "compute and report the read-bound tok/s beside the run's")
    s.add_argument("--routing", choices=("model", "text", "uniform"), default="model",
                   help="MoE expert choice: model = the router on random prompts (default), "
                        "text = the router on --text fed token by token, uniform = uniform "
                        "random experts (the worst case for a cache)")
    s.add_argument("--text", metavar="FILE", help="UTF-8 text for --routing text")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from pocketlm.gguf.reader import GGUFError
    from pocketlm.api.store import StoreError
    try:
        rc = args.func(args)
    except BrokenPipeError:  # output piped into e.g. `head`: not an error
        sys.stderr.close()
        return 0
    except (CLIError, GGUFError, StoreError, ValueError, OSError) as e:
        print(f"pocketlm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pocketlm: interrupted", file=sys.stderr)
        return 130
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
