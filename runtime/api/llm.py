"""The public Python API: ``LLM.load(...)`` then tokenize / eval / generate / chat."""
from __future__ import annotations

import gc
import operator
import os
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np

from pocketlm.api import store
from pocketlm.api.build import build_model, trim_heap
from pocketlm.api.config import LoadConfig
from pocketlm.api.lock import FairLock
from pocketlm.gguf.reader import name_file, open_gguf
from pocketlm.generate import constrain
from pocketlm.generate.loop import (GenerationChunk, GenerationConfig, GenerationResult,
                              collect, prefill, stream_generate)
from pocketlm.text.tools import (auto_grammars, call_grammar, check_tools, family_for,
                                 template_messages, tool_choice_names, with_tool_calls)

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)


class LLMClosedError(ValueError):
    """A method of an LLM was called after ``close()``."""


class StreamOpenError(RuntimeError):
    """A call on the thread whose streamed generation of the same LLM is paused."""


class LLM:
    """A loaded model with its tokenizer, chat template and KV cache.

    Safe to share between threads: generations run one at a time (a fair lock queues them).
    Use as a context manager, or call ``close()`` to release the mapped file and the cache.
    """

    def __init__(self, gguf_file, model, tokenizer, template, n_ctx: int, chunk: int,
                 load_s: float, config: LoadConfig | None = None):
        self.gguf = gguf_file
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.n_ctx = n_ctx
        self.chunk = chunk
        self.load_s = load_s
        self.compile_s = 0.0   # of load_s: waiting for kernels to compile (a cold cache)
        self.defaults = GenerationConfig()
        # encoders run whole sequences: no KV cache
        self.cache = model.new_cache(n_ctx, chunk) if model.capabilities.generate else None
        self.max_memory: int | None = None
        self.config = config or LoadConfig(n_ctx=n_ctx, chunk=chunk)   # what it was loaded with
        self.device, self.device_note = "cpu", None   # set by load: where the model runs, why
        self._lock = FairLock()
        self._active: threading.Event | None = None  # cancel event of the running generation
        self._holder: int | None = None   # thread id of the call holding the lock

    @classmethod
    def load(cls, model: str | None = None, config: LoadConfig | None = None, *,
             progress: ProgressFn | None = None, **overrides) -> "LLM":
        """Load a model by store name (pulled on first use) or ``.gguf`` path; without one, the
        store's default (``store.DEFAULT_MODEL``, Qwen2.5-Coder-0.5B-Instruct).

        ``config`` is a ``LoadConfig``; keyword arguments are its fields and override it
        (``LLM.load(m, n_ctx=2048)`` is ``LLM.load(m, LoadConfig(n_ctx=2048))``). The loaded
        model keeps it as ``llm.config``. ``progress(stage, done, total)`` reports download
        and load.

        ``n_ctx`` defaults to the model's training context capped at 4096; ``threads`` to all
        cores; ``chat_template`` is a path to a Jinja file overriding the model's template.
        ``memory_budget`` (bytes or a size such as "1GiB") caps the whole process: a budget
        that cannot work is refused with the minimum that would; a mixture-of-experts model
        then streams its experts from disk through a cache of what fits, evicting by
        ``expert_policy`` (lru, lfu, predictive; see docs/experts.md).
        ``sparse_attention`` ("auto", "on", "off") applies to models with block-sparse
        attention (MiniCPM: InfLLM v2, see docs/minicpm.md); "on" is an error for others.
        ``backend`` "numpy" runs models that offer it (tiny encoders) without any JIT;
        ``max_memory`` (bytes, or a size such as "781kB") refuses inputs whose weights plus
        activations would exceed it (models with memory accounting, see docs/embbert.md).
        ``device`` "cpu", "cuda" or "auto" (the GPU when one is usable, else the CPU, with the
        reason in ``llm.device_note``); ``gpu_budget`` (bytes or a size) caps the GPU memory of
        mixture-of-experts weights, which then stream from host memory (docs/cuda.md).
        """
        if config is not None and not isinstance(config, LoadConfig):
            raise TypeError(f"config must be a LoadConfig, not {type(config).__name__}")
        c = (config or LoadConfig()).replace(**overrides)   # every setting checked here, once
        from pocketlm.nn import backend as devices
        device, device_note = devices.resolve(c.device)   # auto without a GPU: the budget idles
        from pocketlm import kernels
        from pocketlm.api import warmup
        from pocketlm.text.chat import ChatTemplate
        from pocketlm.text.tokenizer import Tokenizer

        t0 = time.perf_counter()
        path = store.resolve(model or store.DEFAULT_MODEL, pull_missing=c.pull, progress=progress)
        if c.threads:
            kernels.set_threads(c.threads)
        if progress:
            progress("load", 0, 3)
        g = open_gguf(path)
        workers = None
        try:
            # kernels compile in worker processes while this one reads the model (cold only)
            workers = warmup.start(g, c) if device == "cpu" else None
            if progress:
                progress("load", 1, 3)
            m, n_ctx, memory_plan = build_model(g, c, device)
            caps = m.capabilities
            if caps.generate:
                tok = Tokenizer.from_metadata(g.metadata)
                template = ChatTemplate.from_metadata(g.metadata, override_path=c.chat_template)
            else:
                tok, template = _encoder_tokenizer(g.metadata), None
            if progress:
                progress("load", 2, 3)
            if device != "cpu":
                m = devices.place(m, device, c.gpu_budget)
            llm = cls(g, m, tok, template, n_ctx, c.chunk, 0.0, c)
            llm.memory_plan = memory_plan
            llm.device, llm.device_note = device, device_note
            if c.max_memory is not None:
                llm.set_memory_limit(c.max_memory)
            if progress:
                progress("load", 3, 3)
            llm.compile_s = workers.wait(progress) if workers else 0.0
        except Exception as e:
            g.close()
            if isinstance(e, ValueError):   # a bad file or setting: one line naming the file
                raise name_file(e, path)
            raise
        finally:
            if workers:
                workers.stop()
        llm.load_s = time.perf_counter() - t0
        return llm

    # -- encoders ------------------------------------------------------------------------------
    def set_memory_limit(self, limit: int | str | None) -> None:
        """Refuse inputs whose paper-style memory need (runtime.memory) exceeds ``limit``
        (bytes or a size string; None: no limit). A model whose weights alone exceed it is
        refused at once."""
        from pocketlm.api import memory
        from pocketlm.experts.budget import parse_size
        self._check_open()
        if limit is None:
            self.max_memory = None
            return
        limit = parse_size(limit)
        memory.check(memory.account(self.gguf, self.model, 1), limit, "the model")
        self.max_memory = limit

    def classify(self, texts: list) -> tuple[list[str], np.ndarray]:
        """Classify each item of ``texts`` (a string, or a list of token ids).

        Returns (labels, probs): the argmax label names and float32 softmax probabilities
        [len(texts), n_labels]. A one-output (regression) head returns its raw score in probs.
        Text is tokenized with the model's tokenizer and truncated to the model's positions.
        """
        from pocketlm.api import memory
        self._check_open()
        m = self.model
        if not m.capabilities.classify:
            raise ValueError(f"{self.gguf.arch} models are not classifiers")
        if isinstance(texts, str):
            raise ValueError("classify takes a list of texts (or of token-id lists)")
        seqs = [self._encoder_ids(t) for t in texts]
        if self.max_memory is not None:
            for i, ids in enumerate(seqs):
                memory.check(memory.account(self.gguf, m, len(ids)), self.max_memory,
                             f"input {i} ({len(ids)} tokens)")
        with self._turn():
            logits = np.stack([m.classify_logits(ids) for ids in seqs]) if seqs else \
                np.zeros((0, len(m.labels)), np.float32)
        if logits.shape[1] == 1:
            probs = logits
        else:
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        return [m.labels[i] for i in logits.argmax(axis=1)], probs

    def embed(self, texts: list, batch_size: int = 32, truncate: bool = True) -> np.ndarray:
        """Sentence embeddings float32 [len(texts), dim] of unit length (BERT-family encoders).

        Items are texts or token-id lists. Texts are tokenized with special tokens parsed, so a
        literal ``[SEP]`` counts as one, as in Hugging Face tokenizers. An input longer than the
        model's maximum (``sentence_transformers.max_seq_length``, else its context) is cut to
        it, keeping the closing ``[SEP]``; ``truncate=False`` makes that an error instead.
        Inputs run in padded, masked batches of ``batch_size``, longest first.
        """
        self._check_open()
        m = self.model
        if not m.capabilities.embed:
            raise ValueError(f"{self._name} is not an embedding model")
        if isinstance(texts, str):
            raise ValueError("embed takes a list of texts (or of token-id lists)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        limit = m.args.max_seq_len
        seqs = []
        for i, t in enumerate(texts):
            ids = (self.tokenizer.encode(t, add_special=True, parse_special=True)
                   if isinstance(t, str) else [int(x) for x in t])
            if len(ids) > limit:
                if not truncate:
                    raise ValueError(f"input {i} has {len(ids)} tokens; the model takes {limit}")
                ids = ids[:limit - 1] + ids[-1:]
            seqs.append(ids)
        out = np.empty((len(seqs), m.args.n_embd), np.float32)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # less padding per batch
        with self._turn():
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                out[idx] = m.embed([seqs[i] for i in idx])
        return out

    @property
    def _name(self) -> str:
        return str(self.gguf.metadata.get("general.name") or os.path.basename(self.gguf.path))

    def _check_open(self) -> None:
        if self.model is None:
            raise LLMClosedError("this LLM is closed")

    def _check_no_paused_stream(self) -> None:
        # a stream paused on this thread holds the lock: waiting for it would never end
        if self._holder == threading.get_ident():
            raise StreamOpenError("a streamed generation of this LLM is still open on this "
                                  "thread; finish or close it first")

    @contextmanager
    def _turn(self, closing: bool = False):
        """Hold the model for one call; calls from other threads queue in arrival order."""
        self._check_no_paused_stream()
        with self._lock:
            self._holder = threading.get_ident()
            try:
                if not closing:   # close() after close() is a no-op
                    self._check_open()
                yield
            finally:
                self._holder = None

    def _decoder_only(self, what: str) -> None:
        self._check_open()
        if not self.model.capabilities.generate:
            raise ValueError(f"{self._name} is an encoder: it has no {what} (use embed or "
                             "classify)")

    def _encoder_ids(self, item) -> list[int]:
        if isinstance(item, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids instead of text")
            return self.tokenizer.encode(item, add_special=True)[:self.n_ctx]
        return [int(t) for t in item]

    def _token_ids(self, ids) -> list[int]:
        """``ids`` (of a decoder) as a list of ints, each a row of the embedding table."""
        n_vocab = self.model.args.n_vocab
        out = []
        for t in ids:
            try:
                i = operator.index(t)
            except TypeError:
                raise ValueError(f"token ids must be integers, not {type(t).__name__}") from None
            if not 0 <= i < n_vocab:
                raise ValueError(f"token id {i} is out of range: the vocabulary has "
                                 f"{n_vocab} tokens")
            out.append(i)
        return out

    # -- tokens --------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        self._check_open()
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, ids) -> str:
        self._check_open()
        return self.tokenizer.decode(list(ids))

    # -- raw evaluation ------------------------------------------------------------------------
    def eval(self, ids, last_n: int | None = None) -> np.ndarray:
        """Logits float32 [len(ids), n_vocab] for ``ids`` evaluated from position 0 in a fresh
        context (``last_n``: only the last n rows, which saves the output head's work)."""
        self._decoder_only("eval")
        ids = self._token_ids(ids)
        if not ids:
            raise ValueError("eval needs at least one token")
        with self._turn():
            cache = self.model.new_cache(len(ids), self.chunk)
            return prefill(self.model, cache, ids, self.chunk, n_logits=last_n)

    # -- generation ----------------------------------------------------------------------------
    def _config(self, overrides: dict) -> GenerationConfig:
        return self.defaults.replace(**overrides)

    def _run(self, prompt_ids: Callable[[], list[int]], cfg: GenerationConfig,
             cancel: threading.Event, guide=None) -> Iterator[GenerationChunk]:
        # the prompt is rendered and tokenized in turn, under the lock: concurrent requests
        # with huge texts would otherwise each hold their tokenization's memory at once
        with self._turn():
            self._active = cancel
            try:
                ids = prompt_ids()
                yield from stream_generate(self.model, self.tokenizer, self.cache, ids,
                                           cfg, self.chunk, cancel, self.load_s, guide)
            finally:
                self._active = None

    def generate(self, prompt: str | list[int], *, stream: bool = False,
                 cancel: threading.Event | None = None, **settings):
        """Complete ``prompt`` (text or token ids). Settings are ``GenerationConfig`` fields.

        ``stream=True`` returns an iterator of ``GenerationChunk``; otherwise a
        ``GenerationResult``. Setting ``cancel`` (an Event) stops this generation, whether it
        runs or still waits its turn; it ends with finish_reason "cancelled".

        ``response_format`` ({"type": "json_object"} or {"type": "json_schema", "json_schema":
        {"name": ..., "schema": {...}}}), ``grammar`` (Lark, or GBNF) or ``regex`` constrain
        the output; ``logprobs=True`` (with ``top_logprobs=k``) fills ``logprobs`` of each
        chunk and of the result. A constraint that cannot be compiled raises
        ``ConstraintError`` (a ValueError) before anything runs.
        """
        self._decoder_only("generate")
        if isinstance(prompt, str):
            return self._generate(lambda: self.tokenize(prompt), stream, cancel, settings)
        ids = self._token_ids(prompt)
        return self._generate(lambda: ids, stream, cancel, settings)

    def _generate(self, prompt_ids: Callable[[], list[int]], stream: bool,
                  cancel: threading.Event | None, settings: dict, tool_setup=None):
        self._check_no_paused_stream()   # now, not at a stream's first chunk
        cfg = self._config(settings)
        # compiled here, before the model's turn: a bad grammar fails at once
        constraint = constrain.from_settings(cfg, self.tokenizer)
        guide = constraint.guide() if constraint is not None else None
        family = names = None
        if tool_setup is not None:
            family, names, tool_guide = tool_setup
            if tool_guide is not None:
                if guide is not None and not isinstance(tool_guide, constrain.FirstOf):
                    raise ValueError("tool_choice required or named cannot be combined with "
                                     "response_format, grammar or regex")
                guide = guide or tool_guide   # under auto, a text constraint wins
        chunks = self._run(prompt_ids, cfg, cancel or threading.Event(), guide)
        if family is not None:
            chunks = with_tool_calls(chunks, family, names)
        return chunks if stream else collect(chunks)

    def _tool_setup(self, tools, tool_choice, parallel: bool):
        """(tools for the template, (family, callable names, guide) or None) for ``chat``."""
        if tools is None:
            if tool_choice not in (None, "none"):
                raise ValueError("tool_choice needs tools")
            return None, None
        check_tools(tools)
        mode, names = tool_choice_names(tools, tool_choice)
        if mode == "none":   # the model is not told about tools it may not call
            return None, None
        family = family_for(self.template.source)
        # a named function is called once, as OpenAI does
        parallel = parallel and not isinstance(tool_choice, dict)
        if mode == "required":
            guide = constrain.Constraint(call_grammar(family, tools, names, parallel),
                                         self.tokenizer, "tools").guide()
        else:
            guide = constrain.FirstOf([
                constrain.LazyGuide(constrain.Constraint(g, self.tokenizer, "tools"), trigger,
                                    at_start)
                for g, trigger, at_start in auto_grammars(family, tools, names, parallel)])
        return tools, (family, names, guide)

    def chat(self, messages: list[dict], *, stream: bool = False, tools=None, tool_choice=None,
             parallel_tool_calls: bool = True, cancel: threading.Event | None = None,
             **settings):
        """Answer a conversation rendered with the model's chat template (in turn with other
        generations; ``cancel`` stops the render too, with a ChatTemplateError).

        ``tools`` (OpenAI's ``[{"type": "function", "function": {"name", "description",
        "parameters"}}]``) go to the template; calls the model writes come back parsed as
        ``tool_calls`` (result) or tool-call deltas (chunks), with finish_reason
        "tool_calls". ``tool_choice``: "auto" (default; the grammar enforces a call's
        arguments once the model starts one), "none", "required", or {"type": "function",
        "function": {"name": ...}} (called once). ``parallel_tool_calls=False`` allows one
        call per turn. Messages may carry OpenAI's ``tool_calls`` and
        ``role: "tool"`` results. Other settings as in ``generate``.
        """
        self._decoder_only("chat")
        cancel = cancel or threading.Event()
        template_tools, tool_setup = self._tool_setup(tools, tool_choice, parallel_tool_calls)
        messages = template_messages(messages)
        return self._generate(lambda: self._chat_ids(messages, template_tools, cancel), stream,
                              cancel, settings, tool_setup)

    def _chat_ids(self, messages: list[dict], tools, cancel: threading.Event) -> list[int]:
        """The prompt of a chat: ``messages`` (as ``template_messages`` gives them) rendered
        for an answer, tokenized."""
        tok = self.tokenizer
        text, plain = self.template.render_marked(
            messages, tok.control_texts, add_generation_prompt=True, tools=tools,
            bos_token=tok.bos_text, eos_token=tok.eos_text, cancel=cancel)
        # control tokens only where the template wrote them, never in what users wrote
        ids = tok.encode(text, add_special=True, parse_special=True, plain=plain)
        # a template that writes the BOS itself must not get a second one
        bos = tok.bos_id
        if len(ids) > 1 and bos is not None and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]
        return ids

    def warm(self, messages: list[dict] = ()) -> None:
        """Get the next ``chat`` on ``messages`` plus a new user message ready before that
        message is known: evaluate the prompt they begin with (the template's preamble and
        the conversation so far) into the model's cache, and take one decoded step, which
        also loads every kernel of a chat. That ``chat`` then starts from there, as any
        prompt reuses the cached prefix it shares. ``pocketlm chat`` calls this while it
        waits for input."""
        self._decoder_only("warm")
        if self.template is None:
            return
        cancel = threading.Event()
        msgs = template_messages(list(messages))
        # what the prompt is for two different user messages shares: the part before one
        a, b = (self._chat_ids(msgs + [{"role": "user", "content": c}], None, cancel)
                for c in ("a", "b"))
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        if n:
            collect(self._run(lambda: a[:n], self._config({"max_tokens": 2, "temperature": 0}),
                              cancel))

    def cancel(self):
        """Stop the running generation at the next decode step or prefill chunk (queued ones
        are untouched: give them a ``cancel`` event of their own)."""
        active = self._active
        if active is not None:
            active.set()

    # -- lifetime ------------------------------------------------------------------------------
    def close(self):
        """Release the KV cache and the mapped model file."""
        self._check_no_paused_stream()   # before cancelling that stream
        self.cancel()
        with self._turn(closing=True):
            self.cache = None
            m = self.model
            if m is not None and m.capabilities.moe:
                m.experts.close()   # the disk cache holds files and I/O threads
            self.model = None
            if self.gguf is not None:
                self.gguf.close()
                self.gguf = None
        gc.collect()
        trim_heap()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _encoder_tokenizer(meta: dict):
    """An encoder's tokenizer: GGUF vocabulary, an embedded HF tokenizers JSON, or none
    (the model then takes token ids only)."""
    from pocketlm.text.hf_tokenizer import HF_JSON_KEY, HFTokenizer
    from pocketlm.text.tokenizer import Tokenizer
    if "tokenizer.ggml.tokens" in meta:
        return Tokenizer.from_metadata(meta)
    if HF_JSON_KEY in meta:
        return HFTokenizer.from_metadata(meta)
    return None
