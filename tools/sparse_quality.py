"""How close InfLLM v2 block-sparse attention stays to dense attention on long inputs.

A model reads ``n`` tokens of text (the file repeated until long enough) with dense attention;
for the last ``queries`` tokens every global attention layer's queries and the full key/value
cache are captured. Per layer and query head it reports the attention-mass recall of the
selected blocks (the share of the dense softmax mass that falls in the kept blocks) and the
max |Δ| between sparse and dense attention outputs (relative to the dense output's largest
value). It then evaluates the same last tokens again with sparse attention on and compares
the logits. A synthetic needle check places one matching key far back in random keys.

    python -m tools.sparse_quality MODEL -f TEXT [-n 16384] [--queries 8]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from pocketlm import nn
from pocketlm.kernels.attention import attend
from pocketlm.kernels.sparse_attention import (CompressedKeys, SparseConfig, attend_sparse,
                                              select_blocks)
from pocketlm.nn.kvcache import LayerCache


def layer_quality(q, cache, positions, scale, cfg: SparseConfig) -> dict:
    """Recall and output error of sparse vs dense attention for queries q (n, H, D) over a
    filled global LayerCache."""
    n, H, D = q.shape
    KVH, S = cache.kt.shape[0], cache.n_slots
    g = H // KVH
    keys = CompressedKeys(KVH, D, cache.capacity, cfg)
    keys.update(cache.kt, 0, int(positions.max()))
    sel = select_blocks(q, keys, positions, scale)
    dense = attend(q, cache.kt, cache.v, cache.slot_pos, S, positions, scale)
    sparse = attend_sparse(q, cache.kt, cache.v, cache.slot_pos, S, positions, scale, keys)
    recall = []
    for t, p in enumerate(positions):
        for kh in range(KVH):
            z = q[t, kh * g:(kh + 1) * g].astype(np.float64) @ cache.kt[kh, :, :p + 1] * scale
            w = np.exp(z - z.max(1, keepdims=True))
            w /= w.sum(1, keepdims=True)                                  # (g, p+1)
            mask = np.zeros(p + 1, bool)
            for b in sel[t][kh]:
                mask[b * cfg.block_size:(b + 1) * cfg.block_size] = True
            recall.extend(w[:, mask].sum(1).tolist())
    err = np.abs(sparse - dense).max() / max(np.abs(dense).max(), 1e-12)
    return {"recall_mean": float(np.mean(recall)), "recall_min": float(np.min(recall)),
            "max_rel_delta": float(err),
            "blocks_kept": int(np.mean([len(s) for r in sel for s in r])),
            "blocks_total": int(positions.max()) // cfg.block_size + 1}


def model_quality(llm, ids: list[int], queries: int, cfg: SparseConfig) -> dict:
    """Dense prefill of ids[:-queries]; then the last tokens densely (capturing attention
    inputs) and sparsely, from the same cache."""
    from pocketlm.generate.loop import prefill
    model = llm.model
    head, tail = ids[:-queries], ids[-queries:]
    cache = model.new_cache(len(ids), llm.chunk)
    t0 = time.perf_counter()
    prefill(model, cache, head, llm.chunk, n_logits=1)
    t_prefill = time.perf_counter() - t0
    captured = []

    class Spy(nn.CPUOps):
        """CPU ops keeping each global layer's attention inputs (sparse attention runs on
        the CPU only)."""

        def attention(self, q, k, v, c, positions, scale, *rest):
            out = super().attention(q, k, v, c, positions, scale, *rest)
            if c.window == 0:
                captured.append((q.copy(), c, positions.copy(), scale))
            return out

    spy = Spy(model.ops.numerics)
    n_past = cache.n_past
    pos = np.arange(n_past, n_past + queries)
    dense_logits = model.forward(np.array(tail), pos, cache, n_logits=queries, ops=spy)
    layers = [layer_quality(q, c, p, s, cfg) for q, c, p, s in captured]
    out = {"n_tokens": len(ids), "queries": queries, "prefill_s": round(t_prefill, 1),
           "layers": layers,
           "recall_mean": float(np.mean([x["recall_mean"] for x in layers])),
           "recall_min": float(np.min([x["recall_min"] for x in layers])),
           "max_rel_delta": float(np.max([x["max_rel_delta"] for x in layers]))}
    if model.capabilities.sparse_attention:
        # the same last tokens, sparse in every layer, from the same cache contents
        model.configure(n_ctx=llm.n_ctx, sparse_attention="on")
        cache.truncate(n_past)
        cache.compressed = [CompressedKeys(model.args.n_head_kv, model.args.head_dim,
                                           cache.n_ctx, model.sparse)
                            for _ in cache.layers]
        sparse_logits = model.forward(np.array(tail), pos, cache, n_logits=queries)
        model.configure(n_ctx=llm.n_ctx, sparse_attention="off")
        out["logits_max_abs_delta"] = float(np.abs(sparse_logits - dense_logits).max())
        out["logits_std"] = float(dense_logits.std())
        out["top1_agree"] = float(np.mean(sparse_logits.argmax(1) == dense_logits.argmax(1)))
    return out


def needle(n: int, cfg: SparseConfig, seed: int = 0, depth: float = 0.1) -> dict:
    """One key matching the query at ``depth`` of n random keys: is its block kept, and how
    far is the sparse output from the dense one?"""
    D, G = 64, 8
    rng = np.random.default_rng(seed)
    cache = LayerCache(1, D, n)
    k = 0.3 * rng.standard_normal((n, 1, D)).astype(np.float32)
    v = rng.standard_normal((n, 1, D)).astype(np.float32)
    u = rng.standard_normal(D).astype(np.float32)
    u /= np.linalg.norm(u)
    at = int(depth * n)
    k[at, 0], v[at, 0] = 30 * u, 5.0
    cache.store(k, v, np.arange(n))
    q = (np.tile(3 * u, (1, G, 1)) + 0.1 * rng.standard_normal((1, G, D))).astype(np.float32)
    r = layer_quality(q, cache, np.array([n - 1]), 1 / np.sqrt(D), cfg)
    keys = CompressedKeys(1, D, n, cfg)
    keys.update(cache.kt, 0, n - 1)
    kept = select_blocks(q, keys, np.array([n - 1]), 1 / np.sqrt(D))[0][0]
    r["needle_position"] = at
    r["needle_block_kept"] = bool(at // cfg.block_size in kept.tolist())
    return r


def main(argv=None):
    from pocketlm import LLM
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("-f", "--file", required=True, help="text to read (repeated as needed)")
    ap.add_argument("-n", "--n-tokens", type=int, nargs="+", default=[16384])
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("-t", "--threads", type=int, default=None)
    a = ap.parse_args(argv)
    cfg = SparseConfig(dense_len=0)
    text = open(a.file, encoding="utf-8").read()
    results = []
    with LLM.load(a.model, n_ctx=max(a.n_tokens), threads=a.threads,
                  sparse_attention="off") as llm:
        base = llm.tokenize(text)
        for n in a.n_tokens:
            ids = (base * (n // len(base) + 1))[:n]
            r = model_quality(llm, ids, a.queries, cfg)
            r["needle"] = needle(n, cfg)
            results.append(r)
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
