"""Token sampling with llama.cpp's semantics.

Order follows llama.cpp's default chain: penalties → top_k → top_p → min_p → temperature → dist.
Penalties are logits processors (they need the token history); the rest is a sampler closure
``logits -> token id`` over its own ``np.random.Generator``, so a seed reproduces a run.

Vocabularies reach 262k entries, so the sampler avoids sorting the whole vocabulary: top_k
uses ``argpartition``; min_p and top_p first drop tokens too light to matter, then sort.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["make_sampler", "make_logits_processors", "sampling_distribution"]

Sampler = Callable[[np.ndarray], int]
LogitsProcessor = Callable[[np.ndarray, list[int]], np.ndarray]

def _top_sorted(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest entries of ``x``, largest first."""
    n = x.shape[0]
    if k >= n:
        idx = np.arange(n)
    else:
        idx = np.argpartition(x, n - k)[n - k:]
    return idx[np.argsort(-x[idx], kind="stable")]


def _min_p_logit(m: float, min_p: float) -> np.float32:
    # float32, as llama.cpp computes max_logit + logf(p)
    return np.float32(m) + np.log(np.float32(min_p))


def sampling_distribution(logits: np.ndarray, *, temperature: float = 0.8, top_k: int = 40,
                          top_p: float = 0.95, min_p: float = 0.05
                          ) -> tuple[np.ndarray, np.ndarray]:
    """The tokens a sampler may pick and their probabilities, most likely first.

    Returns ``(ids, probs)``: int64 and float64 arrays, probs summing to 1. top_p and min_p are
    measured on the top_k survivors before temperature, as llama.cpp's chain does;
    ``temperature <= 0`` leaves only the argmax. ``top_k=0``, ``top_p=1.0`` and ``min_p=0.0``
    each disable their filter.
    """
    ids, w = _candidates(np.asarray(logits, dtype=np.float32).reshape(-1), temperature, top_k,
                         top_p, min_p, ordered=True)
    return ids, w / w.sum()


def _candidates(x: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float,
                ordered: bool) -> tuple[np.ndarray | None, np.ndarray]:
    """Surviving ids and their unnormalized weights (after temperature).

    ``ordered=False`` skips sorting where no filter needs it: the sampler ignores order.
    """
    n = x.shape[0]                                           # x: (n_vocab,) float32
    m = float(np.max(x))
    if temperature <= 0 or not np.isfinite(m):  # greedy, or everything masked
        return np.array([int(np.argmax(x))]), np.ones(1)

    k = n if top_k <= 0 else min(top_k, n)
    if k < n:
        ids = _top_sorted(x, k)                              # (k,)
        w = np.exp(x[ids].astype(np.float64) - m)
        z = float(w.sum())
    elif min_p <= 0.0 and top_p >= 1.0:
        if not ordered:
            w = np.exp((x - m) / np.float32(temperature))   # (n_vocab,) float32
            return None, w  # identity ids
        ids = _top_sorted(x, n)
        w = np.exp(x[ids].astype(np.float64) - m)
        z = float(w.sum())
    elif min_p > 0.0:
        # min_p keeps a prefix of the sorted order (prob >= min_p * max prob); applying it
        # before top_p gives the same set and bounds the sort.
        z = float(np.exp(x - np.float32(m)).sum(dtype=np.float64))
        cand = np.flatnonzero(x >= _min_p_logit(m, min_p))
        ids = cand[np.argsort(-x[cand], kind="stable")]
        w = np.exp(x[ids].astype(np.float64) - m)
    else:
        # top_p alone over the whole vocabulary: find the cutoff weight with a value sort
        # (several times cheaper than an argsort), then gather the ids at or above it.
        w_all = np.exp(x - np.float32(m))                    # (n_vocab,) float32
        z = float(w_all.sum(dtype=np.float64))
        # Tokens lighter than (1 - top_p) / n hold at most 1 - top_p together, so the cutoff
        # lies among the heavier ones; halved for rounding slack.
        heavy = np.sort(w_all[w_all >= np.float32(0.5 * (1.0 - top_p) * z / n)])[::-1]
        c = np.cumsum(heavy, dtype=np.float64) / z
        last = min(int(np.searchsorted(c, top_p, side="left")) + 1, heavy.shape[0])
        cut = heavy[last - 1]
        ids = np.flatnonzero(w_all > cut)
        if ids.shape[0] < last:  # ties at the cutoff: lowest ids first, like a stable sort
            ids = np.concatenate([ids, np.flatnonzero(w_all == cut)[:last - ids.shape[0]]])
        if ordered:
            ids = ids[np.argsort(-x[ids], kind="stable")]
        w = np.exp((x[ids].astype(np.float64) - m) / temperature)
        return ids.astype(np.int64), w

    if min_p > 0.0 and k < n:
        keep = max(int(np.count_nonzero(x[ids] >= _min_p_logit(m, min_p))), 1)
        ids, w = ids[:keep], w[:keep]
    if top_p < 1.0:
        c = np.cumsum(w) / z
        # first position whose cumulative probability reaches p; that token is kept
        last = min(int(np.searchsorted(c, top_p, side="left")) + 1, ids.shape[0])
        ids, w = ids[:last], w[:last]

    if temperature != 1.0:
        w = np.exp((x[ids].astype(np.float64) - m) / temperature)
    return ids.astype(np.int64), w


_BLOCK = 1024


def _draw(w: np.ndarray, u: float) -> int:
    """Index drawn with probability proportional to ``w``, for ``u`` uniform in [0, 1).

    Long arrays use block sums, then a cumsum inside one block: a float64 cumsum over the
    whole vocabulary costs more than all the filtering.
    """
    n = w.shape[0]
    if n <= 4 * _BLOCK:
        c = np.cumsum(w, dtype=np.float64)
        i = int(np.searchsorted(c, u * c[-1], side="right"))
        return _last_positive(w, min(i, n - 1))
    full = n - n % _BLOCK
    sums = w[:full].reshape(-1, _BLOCK).sum(axis=1, dtype=np.float64)      # (n_blocks,)
    if full < n:
        sums = np.append(sums, w[full:].sum(dtype=np.float64))
    cs = np.cumsum(sums)
    target = u * cs[-1]
    b = min(int(np.searchsorted(cs, target, side="right")), cs.shape[0] - 1)
    while sums[b] <= 0:  # rounding can land on an empty block; step back to a live one
        b -= 1
    block = w[b * _BLOCK:(b + 1) * _BLOCK]
    c = np.cumsum(block, dtype=np.float64)
    i = int(np.searchsorted(c, target - (cs[b - 1] if b else 0.0), side="right"))
    return b * _BLOCK + _last_positive(block, min(i, block.shape[0] - 1))


def _last_positive(w: np.ndarray, i: int) -> int:
    # a draw past the end (rounding) must not land on a zero-weight (masked) token
    while i > 0 and w[i] <= 0:
        i -= 1
    return i


def make_sampler(temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95,
                 min_p: float = 0.05, seed: int | None = None) -> Sampler:
    """A ``logits -> token id`` closure with llama.cpp's default filter chain.

    ``temperature <= 0`` is greedy argmax. ``top_k=0``, ``top_p=1.0``, ``min_p=0.0`` disable
    their filters. The same ``seed`` gives the same tokens for the same logits.
    """
    if temperature <= 0:
        return lambda logits: int(np.argmax(np.asarray(logits).reshape(-1)))
    rng = np.random.default_rng(seed)

    def sample(logits: np.ndarray) -> int:
        ids, w = _candidates(np.asarray(logits, dtype=np.float32).reshape(-1), temperature,
                             top_k, top_p, min_p, ordered=False)
        if ids is None:
            return _draw(w, rng.random())
        if ids.shape[0] == 1:
            return int(ids[0])
        return int(ids[_draw(w, rng.random())])

    return sample


def make_logits_processors(repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
                           presence_penalty: float = 0.0, last_n: int = 64
                           ) -> list[LogitsProcessor]:
    """Penalties over the last ``last_n`` tokens (``-1``: all, ``0``: off), as llama.cpp does.

    For each distinct token seen ``c`` times: a positive logit is divided by
    ``repetition_penalty`` and a non-positive one multiplied by it, then
    ``c * frequency_penalty + presence_penalty`` is subtracted. Returns an empty list when every
    penalty is neutral. Each processor returns a new array and leaves its input alone.
    """
    if last_n == 0 or (repetition_penalty == 1.0 and frequency_penalty == 0.0
                       and presence_penalty == 0.0):
        return []

    def penalize(logits: np.ndarray, tokens: list[int]) -> np.ndarray:
        out = np.array(logits, dtype=np.float32, copy=True).reshape(-1)   # (n_vocab,)
        window = tokens if last_n < 0 else tokens[-last_n:]
        if len(window) == 0:
            return out
        ids, counts = np.unique(np.asarray(window, dtype=np.int64), return_counts=True)
        ok = (ids >= 0) & (ids < out.shape[0])
        ids, counts = ids[ok], counts[ok].astype(np.float32)
        v = out[ids]
        v = np.where(v <= 0, v * repetition_penalty, v / repetition_penalty)
        out[ids] = v - counts * frequency_penalty - presence_penalty
        return out

    return [penalize]
