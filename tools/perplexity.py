"""Perplexity with llama-perplexity's convention (-c 512 --chunks N).

Each chunk of ``n_ctx`` tokens starts from an empty cache (with the BOS replacing the first
token when the model adds one); only the second half of each chunk is scored, so every scored
token sees at least ``n_ctx/2`` tokens of context.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np


def perplexity(llm, text: str, n_ctx: int = 512, n_chunks: int = 16, progress=None) -> dict:
    """Perplexity of ``text`` under ``llm`` (a ``runtime.LLM``); returns a JSON-friendly dict."""
    tokens = llm.tokenize(text, add_special=True, parse_special=False)
    available = len(tokens) // n_ctx
    if available == 0:
        raise ValueError(f"text has {len(tokens)} tokens, fewer than one chunk of {n_ctx}")
    n_chunks = min(n_chunks, available) if n_chunks > 0 else available
    bos = llm.tokenizer.bos_id if llm.tokenizer.add_bos else None
    first = n_ctx // 2
    chunk_nll = []
    t0 = time.perf_counter()
    for c in range(n_chunks):
        seq = list(tokens[c * n_ctx:(c + 1) * n_ctx])
        if bos is not None:
            seq[0] = bos
        logits = llm.eval(seq, last_n=n_ctx - first)             # (n_ctx - first, n_vocab)
        scored = logits[:-1].astype(np.float64)
        m = scored.max(axis=1, keepdims=True)
        logz = (m[:, 0] + np.log(np.exp(scored - m).sum(axis=1)))
        targets = np.asarray(seq[first + 1:n_ctx])
        nll = logz - scored[np.arange(len(targets)), targets]
        chunk_nll.append(nll)
        if progress:
            progress("chunks", c + 1, n_chunks)
    all_nll = np.concatenate(chunk_nll)
    mean = float(all_nll.mean())
    return {
        "ppl": math.exp(mean),
        "mean_nll": mean,
        "chunk_mean_nll": [float(x.mean()) for x in chunk_nll],
        "n_ctx": n_ctx,
        "n_chunks": n_chunks,
        "n_scored": int(all_nll.size),
        "text_n_tokens": len(tokens),
        "seconds": time.perf_counter() - t0,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="pocketlm perplexity")
    add_arguments(ap)
    return run(ap.parse_args(argv))


def add_arguments(ap: argparse.ArgumentParser):
    ap.add_argument("model", metavar="MODEL")
    ap.add_argument("--file", "-f", required=True, help="UTF-8 text file, used byte for byte")
    ap.add_argument("-c", "--ctx-size", type=int, default=512, help="tokens per chunk")
    ap.add_argument("--chunks", type=int, default=16, help="chunks to score (0: all)")
    ap.add_argument("--threads", "-t", type=int, default=None)
    ap.add_argument("--memory-budget", default=None, metavar="SIZE",
                    help="cap the process's memory (e.g. 1GiB); MoE experts stream from disk")
    ap.add_argument("--cache-policy", choices=("lru", "lfu", "predictive"), default="lru",
                    help="expert cache eviction under --memory-budget")
    ap.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    from pocketlm import LLM
    with open(args.file, "rb") as f:
        text = f.read().decode("utf-8")
    with LLM.load(args.model, threads=args.threads, n_ctx=args.ctx_size,
                  memory_budget=args.memory_budget, expert_policy=args.cache_policy) as llm:
        r = perplexity(llm, text, args.ctx_size, args.chunks)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"perplexity {r['ppl']:.4f} over {r['n_scored']} tokens "
              f"({r['n_chunks']} chunks of {r['n_ctx']}, {r['seconds']:.1f} s)")
    return 0
