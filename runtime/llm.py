"""The public Python API: ``LLM.load(...)`` then tokenize / eval / generate / chat."""
from __future__ import annotations

import gc
import threading
import time
from typing import Callable, Iterator

import numpy as np

from runtime import store
from runtime.concurrency import FairLock
from runtime.gguf import open_gguf
from runtime.generate import (GenerationChunk, GenerationConfig, GenerationResult,
                              prefill, stream_generate)

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)


class LLM:
    """A loaded model with its tokenizer, chat template and KV cache.

    Safe to share between threads: generations run one at a time (a fair lock queues them).
    Use as a context manager, or call ``close()`` to release the mapped file and the cache.
    """

    def __init__(self, gguf_file, model, tokenizer, template, n_ctx: int, chunk: int,
                 load_s: float):
        self.gguf = gguf_file
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.n_ctx = n_ctx
        self.chunk = chunk
        self.load_s = load_s
        self.defaults = GenerationConfig()
        self.cache = model.new_cache(n_ctx, chunk)
        self._lock = FairLock()
        self._active: threading.Event | None = None  # cancel event of the running generation

    @classmethod
    def load(cls, model: str, *, n_ctx: int | None = None, threads: int | None = None,
             chunk: int = 512, chat_template: str | None = None, pull: bool = True,
             progress: ProgressFn | None = None, sparse_attention: str = "auto") -> "LLM":
        """Load a model by store name (pulled on first use) or ``.gguf`` path.

        ``n_ctx`` defaults to the model's training context capped at 4096; ``threads`` to all
        cores; ``chat_template`` is a path to a Jinja file overriding the model's template.
        ``sparse_attention`` ("auto", "on", "off") applies to models with block-sparse
        attention (MiniCPM: InfLLM v2, see docs/minicpm.md); "on" is an error for others.
        """
        if sparse_attention not in ("auto", "on", "off"):
            raise ValueError(f"sparse_attention {sparse_attention!r}: expected auto, on or off")
        from models import load_model
        from runtime import kernels
        from runtime.chat import ChatTemplate
        from runtime.tokenizer import Tokenizer

        t0 = time.perf_counter()
        path = store.resolve(model, pull_missing=pull, progress=progress)
        if threads:
            kernels.set_threads(threads)
        if progress:
            progress("load", 0, 3)
        g = open_gguf(path)
        try:
            m = load_model(g)
            if progress:
                progress("load", 1, 3)
            tok = Tokenizer.from_metadata(g.metadata)
            template = ChatTemplate.from_metadata(g.metadata, override_path=chat_template)
            if progress:
                progress("load", 2, 3)
            train_ctx = int(g.get("{arch}.context_length", 4096))
            n_ctx = n_ctx or min(train_ctx, 4096)
            if n_ctx <= 0:
                raise ValueError("context size must be positive")
            # models whose computation depends on run settings (context, attention mode)
            if hasattr(m, "configure"):
                m.configure(n_ctx=n_ctx, sparse_attention=sparse_attention)
            elif sparse_attention == "on":
                raise ValueError(f"{g.arch} models have no sparse attention")
            llm = cls(g, m, tok, template, n_ctx, chunk, 0.0)
        except Exception:
            g.close()
            raise
        llm.load_s = time.perf_counter() - t0
        if progress:
            progress("load", 3, 3)
        return llm

    # -- tokens --------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    # -- raw evaluation ------------------------------------------------------------------------
    def eval(self, ids, last_n: int | None = None) -> np.ndarray:
        """Logits float32 [len(ids), n_vocab] for ``ids`` evaluated from position 0 in a fresh
        context (``last_n``: only the last n rows, which saves the output head's work)."""
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("eval needs at least one token")
        with self._lock:
            cache = self.model.new_cache(len(ids), self.chunk)
            return prefill(self.model, cache, ids, self.chunk, n_logits=last_n)

    # -- generation ----------------------------------------------------------------------------
    def _config(self, overrides: dict) -> GenerationConfig:
        return self.defaults.replace(**overrides)

    def _run(self, prompt_ids: list[int], cfg: GenerationConfig,
             cancel: threading.Event) -> Iterator[GenerationChunk]:
        with self._lock:
            if self.model is None:
                raise ValueError("the model is closed")
            self._active = cancel
            try:
                yield from stream_generate(self.model, self.tokenizer, self.cache, prompt_ids,
                                           cfg, self.chunk, cancel, self.load_s)
            finally:
                self._active = None

    def generate(self, prompt: str | list[int], *, stream: bool = False,
                 cancel: threading.Event | None = None, **settings):
        """Complete ``prompt`` (text or token ids). Settings are ``GenerationConfig`` fields.

        ``stream=True`` returns an iterator of ``GenerationChunk``; otherwise a
        ``GenerationResult``. Setting ``cancel`` (an Event) stops this generation, whether it
        runs or still waits its turn; it ends with finish_reason "cancelled".
        """
        cfg = self._config(settings)
        ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        chunks = self._run(ids, cfg, cancel or threading.Event())
        return chunks if stream else collect(chunks)

    def chat(self, messages: list[dict], *, stream: bool = False, tools=None,
             cancel: threading.Event | None = None, **settings):
        """Answer a conversation rendered with the model's chat template."""
        text = self.template.render(messages, add_generation_prompt=True, tools=tools,
                                    bos_token=self.tokenizer.bos_text,
                                    eos_token=self.tokenizer.eos_text)
        ids = self.tokenizer.encode(text, add_special=True, parse_special=True)
        # a template that writes the BOS itself must not get a second one
        bos = self.tokenizer.bos_id
        if len(ids) > 1 and bos is not None and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]
        return self.generate(ids, stream=stream, cancel=cancel, **settings)

    def cancel(self):
        """Stop the running generation at the next decode step or prefill chunk (queued ones
        are untouched: give them a ``cancel`` event of their own)."""
        active = self._active
        if active is not None:
            active.set()

    # -- lifetime ------------------------------------------------------------------------------
    def close(self):
        """Release the KV cache and the mapped model file."""
        self.cancel()
        with self._lock:
            self.cache = None
            self.model = None
            if self.gguf is not None:
                self.gguf.close()
                self.gguf = None
        gc.collect()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def collect(chunks: Iterator[GenerationChunk]) -> GenerationResult:
    """Drain a chunk stream into one result."""
    text, tokens, last = [], [], None
    for c in chunks:
        text.append(c.text)
        if c.token is not None:
            tokens.append(c.token)
        last = c
    return GenerationResult("".join(text), tokens, last.finish_reason, last.prompt_tokens,
                            last.completion_tokens, last.timings)
