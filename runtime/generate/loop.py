"""The generation loop, as stacked generators.

``generate_step`` (token ids: chunked prefill, then one decode step per token)
→ ``stream_generate`` (text deltas: UTF-8-safe, stop strings held back, timings)
→ ``LLM.generate`` / ``LLM.chat`` (blocking or streaming).
"""
from __future__ import annotations

import math
import numbers
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Iterator

import numpy as np
import psutil

from pocketlm.nn.kvcache import KVCache
from pocketlm.generate.sampling import make_logits_processors, make_sampler
from pocketlm.generate.textstream import IncrementalDecoder, StopMatcher


class ContextOverflowError(ValueError):
    """The prompt (plus what must be generated) does not fit the context window."""


class Cancelled(Exception):
    """Raised inside the loop when a cancel event is set."""


@dataclass
class GenerationConfig:
    """One set of generation settings shared by the API, the CLI flags and server requests.

    ``max_tokens=None`` generates until an end-of-generation token or a full context.
    ``temperature=0`` is greedy; ``top_k=0``, ``top_p=1``, ``min_p=0`` each disable their filter;
    penalties of 1.0 (repeat) / 0.0 (frequency, presence) are off.
    """
    max_tokens: int | None = None
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repeat_last_n: int = 64
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # log-probabilities of each generated token and of its ``top_logprobs`` best rivals
    logprobs: bool = False
    top_logprobs: int = 0
    # at most one constraint: {"type": "json_object"} / {"type": "json_schema", "json_schema":
    # {"schema": ...}}, a Lark or GBNF grammar, or a regex (runtime.generate.constrain)
    response_format: dict | None = None
    grammar: str | None = None
    regex: str | None = None

    def replace(self, **overrides) -> "GenerationConfig":
        """A copy with the given fields changed; unknown names are an error."""
        names = {f.name for f in fields(self)}
        bad = set(overrides) - names
        if bad:
            raise TypeError(f"unknown generation setting(s): {', '.join(sorted(bad))}")
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update({k: v for k, v in overrides.items() if v is not None})  # None: keep
        cfg = GenerationConfig(**d)
        cfg.validate()
        return cfg

    def __post_init__(self):
        self.validate()

    def validate(self):
        """One-line ValueError naming the setting and its allowed range (the API, the CLI
        and server requests all come through here)."""
        _integer("max_tokens", self.max_tokens, ">= 0", lambda v: v >= 0, optional=True)
        _integer("top_k", self.top_k, ">= 0 (0: off)", lambda v: v >= 0)
        _integer("repeat_last_n", self.repeat_last_n, ">= -1 (-1: all, 0: off)",
                 lambda v: v >= -1)
        # numpy's generator refuses negative seeds
        _integer("seed", self.seed, ">= 0", lambda v: v >= 0, optional=True)
        _real("temperature", self.temperature, ">= 0 (0: greedy)", lambda v: v >= 0)
        _real("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1)
        _real("min_p", self.min_p, "in [0, 1]", lambda v: 0 <= v <= 1)
        # a penalty <= 0 flips or zeroes the logits of every seen token
        _real("repeat_penalty", self.repeat_penalty, "> 0 (1: off)", lambda v: v > 0)
        _real("frequency_penalty", self.frequency_penalty, "(0: off)", lambda v: True)
        _real("presence_penalty", self.presence_penalty, "(0: off)", lambda v: True)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or \
                not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop {self.stop!r}: expected a string or a list of strings")
        self.stop = list(self.stop)
        if not isinstance(self.logprobs, bool):
            raise ValueError(f"logprobs {self.logprobs!r}: expected True or False")
        _integer("top_logprobs", self.top_logprobs, ">= 0", lambda v: v >= 0)
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=True")
        for name in ("grammar", "regex"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"{name}: expected a non-empty string")
        _check_response_format(self.response_format)
        given = [n for n in ("grammar", "regex") if getattr(self, n) is not None]
        if self.response_format is not None and self.response_format["type"] != "text":
            given.append("response_format")
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)}: give only one constraint")


def _check_response_format(fmt) -> None:
    if fmt is None:
        return
    kinds = ("text", "json_object", "json_schema")
    if not isinstance(fmt, dict) or fmt.get("type") not in kinds:
        raise ValueError("response_format: expected {'type': one of " + ", ".join(kinds) + "}")
    if fmt["type"] == "json_schema":
        inner = fmt.get("json_schema")
        if not isinstance(inner, dict) or not isinstance(inner.get("schema"), (dict, bool)):
            raise ValueError("response_format: json_schema needs {'json_schema': {'name': ..., "
                             "'schema': {...}}}")


def _integer(name: str, value, allowed: str, ok, optional: bool = False) -> None:
    if value is None and optional:
        return
    # bool is an int subclass: True would silently mean 1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not ok(value):
        raise ValueError(f"{name} {value!r}: expected an integer {allowed}")


def _real(name: str, value, allowed: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} {value!r}: expected a finite number {allowed}")


@dataclass
class Timings:
    load_s: float = 0.0
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    generated_tokens: int = 0
    generation_s: float = 0.0
    peak_rss_bytes: int = 0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generated_tokens / self.generation_s if self.generation_s > 0 else 0.0


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the distribution the sampler saw (after
    penalties and the grammar mask, before top-k/top-p/min-p and temperature), and the
    ``top`` most likely tokens there as (id, bytes, logprob), best first."""
    token: int
    bytes: bytes
    logprob: float
    top: list[tuple[int, bytes, float]] = field(default_factory=list)


@dataclass
class GenerationChunk:
    """One streamed piece: ``text`` is the new text (may be empty while bytes are held back)."""
    text: str
    token: int | None
    finish_reason: str | None = None   # "stop" | "length" | "cancelled" | "tool_calls" (last)
    prompt_tokens: int = 0             # the whole prompt; timings.prompt_tokens: evaluated
    completion_tokens: int = 0
    timings: Timings | None = None
    logprobs: list[TokenLogprob] | None = None   # the token's, when asked for
    # OpenAI's streamed tool-call deltas: {"index", "id", "type", "function": {"name",
    # "arguments"}} first, then {"index", "function": {"arguments"}}
    tool_calls: list[dict] | None = None


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    timings: Timings
    logprobs: list[TokenLogprob] | None = None
    # OpenAI's tool calls: {"id", "type": "function", "function": {"name", "arguments": str}}
    tool_calls: list[dict] = field(default_factory=list)


def prefill(model, cache: KVCache, ids: list[int], chunk: int,
            cancel: threading.Event | None = None, n_logits: int | None = 1) -> np.ndarray:
    """Evaluate ``ids`` after the cache's current contents, ``chunk`` tokens at a time.

    Returns the logits (n_logits, n_vocab) of the last ``n_logits`` tokens (None: all of them).
    """
    if cache.n_past + len(ids) > cache.n_ctx:
        raise ContextOverflowError(
            f"{cache.n_past + len(ids)} tokens do not fit the context of {cache.n_ctx}; "
            "shorten the prompt or raise the context size (-c/--ctx-size)")
    want_from = 0 if n_logits is None else len(ids) - n_logits
    outs = []
    for s in range(0, len(ids), chunk):
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        part = np.asarray(ids[s:s + chunk], dtype=np.int64)
        pos = np.arange(cache.n_past, cache.n_past + len(part), dtype=np.int64)
        k = s + len(part) - max(want_from, s)
        # prompts run on the model's prompt ops (on the CPU: float activations at any length)
        logits = model.forward(part, pos, cache, n_logits=max(k, 0), ops=model.ops.prompt)
        cache.n_past += len(part)
        cache.tokens.extend(int(t) for t in part)
        if logits is not None:
            outs.append(logits)
    return np.concatenate(outs)


def generate_step(model, cache: KVCache, prompt: list[int], cfg: GenerationConfig,
                  chunk: int = 512, cancel: threading.Event | None = None,
                  timings: Timings | None = None, guide=None
                  ) -> Iterator[tuple[int, np.ndarray | None]]:
    """Yield (token id, logits the sampler saw or None) pairs; the logits come only with
    ``cfg.logprobs``. Reuses the longest cached prefix of ``prompt``. ``guide``
    (runtime.generate.constrain) masks what a grammar forbids.

    Stops when the context is full (the caller reports "length"); raises ``Cancelled``.
    """
    if not prompt:
        raise ValueError("empty prompt")
    common = 0
    for a, b in zip(cache.tokens, prompt):
        if a != b:
            break
        common += 1
    common = min(common, len(prompt) - 1)  # at least one token must run to produce logits
    if not cache.truncate(common):
        common = 0
    t0 = time.perf_counter()
    logits = prefill(model, cache, prompt[common:], chunk, cancel)[-1]
    if timings is not None:
        timings.prompt_tokens = len(prompt) - common
        timings.prompt_s = time.perf_counter() - t0
    sampler = make_sampler(cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p, cfg.seed)
    processors = make_logits_processors(cfg.repeat_penalty, cfg.frequency_penalty,
                                        cfg.presence_penalty, cfg.repeat_last_n)
    history = list(prompt)
    t1 = time.perf_counter()
    while True:
        for proc in processors:
            logits = proc(logits, history)
        if guide is not None:
            logits = guide.mask(logits)
        tok = int(sampler(logits))
        if guide is not None:
            guide.accept(tok)
        history.append(tok)
        if timings is not None:
            timings.generated_tokens += 1
            timings.generation_s = time.perf_counter() - t1
        yield tok, (logits if cfg.logprobs else None)
        if cache.n_past >= cache.n_ctx:
            return
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        pos = np.array([cache.n_past], dtype=np.int64)
        logits = model.forward(np.array([tok], dtype=np.int64), pos, cache)[-1]
        cache.n_past += 1
        cache.tokens.append(tok)


def stream_generate(model, tokenizer, cache: KVCache, prompt: list[int], cfg: GenerationConfig,
                    chunk: int = 512, cancel: threading.Event | None = None,
                    load_s: float = 0.0, guide=None) -> Iterator[GenerationChunk]:
    """Text deltas for a prompt: UTF-8-safe, stop strings never emitted, EOG ids end the stream."""
    timings = Timings(load_s=load_s)
    decoder = IncrementalDecoder()
    stopper = StopMatcher(cfg.stop)
    eog = set(tokenizer.eog_ids)
    n_gen = 0
    finish = "length"
    steps = generate_step(model, cache, prompt, cfg, chunk, cancel, timings, guide)

    def done(text: str, reason: str, token=None) -> GenerationChunk:
        timings.peak_rss_bytes = peak_rss()
        return GenerationChunk(text, token, reason, len(prompt), n_gen, timings)

    if cfg.max_tokens == 0:
        yield done("", "length")
        return
    try:
        for tok, logits in steps:
            if tok in eog:
                finish = "stop"
                break
            n_gen += 1
            lp = None if logits is None else [token_logprob(tokenizer, logits, tok,
                                                            cfg.top_logprobs)]
            text, stopped = stopper.feed(decoder.feed(tokenizer.token_bytes(tok)))
            if stopped:
                c = done(text, "stop", tok)
                c.logprobs = lp
                yield c
                return
            if cfg.max_tokens is not None and n_gen >= cfg.max_tokens:
                tail, _ = stopper.feed(decoder.flush())
                c = done(text + tail + stopper.flush(), "length", tok)
                c.logprobs = lp
                yield c
                return
            yield GenerationChunk(text, tok, None, len(prompt), n_gen, logprobs=lp)
    except Cancelled:
        yield done("", "cancelled")
        return
    finally:
        steps.close()
    tail, stopped = stopper.feed(decoder.flush())
    yield done(tail + ("" if stopped else stopper.flush()), finish)


def token_logprob(tokenizer, logits: np.ndarray, tok: int, top: int) -> TokenLogprob:
    """``tok``'s log-softmax over ``logits`` (float64), and the ``top`` best tokens'."""
    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    m = float(np.max(x))
    lse = m + math.log(float(np.exp(x - m).sum()))
    best = []
    if top > 0:
        k = min(top, x.shape[0])
        ids = np.argpartition(-x, k - 1)[:k] if k < x.shape[0] else np.arange(k)
        ids = ids[np.argsort(-x[ids], kind="stable")]
        best = [(int(i), tokenizer.token_bytes(int(i), special=True), float(x[i] - lse))
                for i in ids]
    return TokenLogprob(tok, tokenizer.token_bytes(tok, special=True), float(x[tok] - lse), best)


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (current RSS where peak is unknown)."""
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except (ImportError, AttributeError):
        return psutil.Process().memory_info().rss


def collect(chunks: Iterator[GenerationChunk]) -> GenerationResult:
    """Drain a chunk stream into one result."""
    text, tokens, last, logprobs, calls = [], [], None, None, []
    for c in chunks:
        text.append(c.text)
        if c.token is not None:
            tokens.append(c.token)
        if c.logprobs is not None:
            logprobs = (logprobs if logprobs is not None else [])
            logprobs.extend(c.logprobs)
        for d in c.tool_calls or ():
            if d["index"] == len(calls):   # a call's first delta: id, type, name
                calls.append({"id": d["id"], "type": d["type"],
                              "function": {"name": d["function"]["name"], "arguments": ""}})
            calls[d["index"]]["function"]["arguments"] += d["function"].get("arguments", "")
        last = c
    return GenerationResult("".join(text), tokens, last.finish_reason, last.prompt_tokens,
                            last.completion_tokens, last.timings, logprobs, calls)
