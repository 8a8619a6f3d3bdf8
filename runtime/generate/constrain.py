"""Constrained decoding through llguidance: JSON schemas, regexes and Lark/GBNF grammars.

A :class:`Constraint` is a grammar checked against a model's tokenizer; each generation gets
its own :class:`Guide` from it, which masks the logits the sampler sees (-inf on every token
the grammar forbids, so greedy decoding and every sampling setting obey it) and advances on
the sampled token. :class:`LazyGuide` leaves the text free until a trigger (such as
``<tool_call>``) and then enforces its grammar from the trigger on.

Schemas and grammars come from clients, so they are untrusted: the text is capped at
``MAX_GRAMMAR_BYTES`` and llguidance compiles under ``LIMITS`` (its fuel bounds bound both the
time and the memory of compilation and of each mask); a failure is one line naming the problem.
"""
from __future__ import annotations

import json
import threading
import weakref

import llguidance as llg
import numpy as np

from pocketlm.text.tokenizer import ATTR_CONTROL, ATTR_UNKNOWN

__all__ = ["ConstraintError", "Constraint", "Guide", "LazyGuide", "FirstOf", "from_settings",
           "json_schema_grammar", "MAX_GRAMMAR_BYTES"]

MAX_GRAMMAR_BYTES = 64 << 10
# about a tenth of llguidance's defaults: a typical schema needs far less, a hostile one
# stops within tens of milliseconds
LIMITS = dict(initial_lexer_fuel=200_000, step_lexer_fuel=100_000, step_max_items=20_000,
              max_lexer_states=50_000, max_grammar_size=100_000, verbose_errors=False)
# JSON as Python's json.dumps writes it: models have seen that spacing most, and a grammar
# without free whitespace cannot spin on blank lines
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstraintError(ValueError):
    """A schema, regex or grammar that cannot be used; ``param`` names the request field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


_tokenizers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()


def lltokenizer(tok) -> llg.LLTokenizer:
    """llguidance's view of our tokenizer (built once per tokenizer: about a second).

    Every token is its bytes, byte-fallback tokens included; control and unknown tokens are
    special (grammar text never matches them); every end-of-generation id counts as EOS.
    """
    with _tokenizers_lock:
        got = _tokenizers.get(tok)
        if got is None:
            got = _tokenizers[tok] = _build_lltokenizer(tok)
        return got


class _Vocab:
    """The attributes llguidance's TokenizerWrapper reads, and encoding for its fallbacks."""

    def __init__(self, tok):
        self._tok = tok
        self.eos_token_id = tok.eos_id if tok.eos_id is not None else min(tok.eog_ids)
        self.bos_token_id = tok.bos_id
        self.tokens = [tok.token_bytes(i, special=True) for i in range(tok.n_vocab)]
        self.special_token_ids = [i for i in range(tok.n_vocab)
                                  if tok.token_attr(i) & (ATTR_CONTROL | ATTR_UNKNOWN)]

    def __call__(self, text) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "surrogateescape")
        return self._tok.encode(text, add_special=False)


def _build_lltokenizer(tok) -> llg.LLTokenizer:
    eos = sorted(tok.eog_ids) or [tok.eos_id]
    return llg.LLTokenizer(llg.TokenizerWrapper(_Vocab(tok)), n_vocab=tok.n_vocab,
                           eos_token=eos)


def _one_line(message: str) -> str:
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    return " ".join(lines[:2]) if lines else "invalid grammar"


def json_schema_grammar(schema, param: str, strict: bool = True) -> str:
    """llguidance's grammar for a JSON schema (a dict). ``strict``: a keyword llguidance does
    not implement (``uniqueItems``, ``not``, ...) is an error; otherwise it is ignored."""
    if not isinstance(schema, (dict, bool)):
        raise ConstraintError(f"{param}: a JSON schema must be an object", param)
    text = json.dumps(schema)
    _check_size(text, param)
    return llg.LLMatcher.grammar_from_json_schema(text, defaults={**JSON_OPTIONS,
                                                                  "lenient": not strict})


def _check_size(text: str, param: str) -> None:
    if len(text.encode("utf-8", "surrogatepass")) > MAX_GRAMMAR_BYTES:
        raise ConstraintError(f"{param} is larger than {MAX_GRAMMAR_BYTES} bytes", param)


def _grammar(response_format, grammar, regex) -> tuple[str, str] | None:
    """(llguidance grammar, parameter name) for the settings, or None when unconstrained."""
    if grammar is not None:
        _check_size(grammar, "grammar")
        try:  # Lark, or GBNF converted to Lark
            return llg.grammar_from("grammar", grammar), "grammar"
        except Exception as e:  # the GBNF converter raises several kinds
            raise ConstraintError(f"grammar: {_one_line(str(e))}", "grammar") from None
    if regex is not None:
        _check_size(regex, "regex")
        return llg.LLMatcher.grammar_from_regex(regex), "regex"
    if response_format is None or response_format["type"] == "text":
        return None
    if response_format["type"] == "json_object":
        return json_schema_grammar({"type": "object"}, "response_format"), "response_format"
    inner = response_format["json_schema"]
    # OpenAI's strict defaults to false: best effort, as its own non-strict mode is
    return (json_schema_grammar(inner["schema"], "response_format", inner.get("strict") is True),
            "response_format")


class Constraint:
    """A grammar compiled for one tokenizer; raises ``ConstraintError`` if it cannot be used."""

    def __init__(self, grammar: str, tokenizer, param: str):
        self.tokenizer = tokenizer
        self._matcher = llg.LLMatcher(lltokenizer(tokenizer), grammar, log_level=0,
                                      limits=llg.LLParserLimits(**LIMITS))
        if self._matcher.is_error():
            raise ConstraintError(f"{param}: {_one_line(self._matcher.get_error())}", param)

    def matcher(self) -> llg.LLMatcher:
        """A fresh matcher at the grammar's start (a copy: no second compilation)."""
        return self._matcher.deep_copy()

    def guide(self) -> "Guide":
        return Guide(self.matcher(), self.tokenizer.n_vocab)


def from_settings(cfg, tokenizer) -> Constraint | None:
    """The constraint a ``GenerationConfig`` asks for (response_format, grammar or regex)."""
    got = _grammar(cfg.response_format, cfg.grammar, cfg.regex)
    return None if got is None else Constraint(got[0], tokenizer, got[1])


class Guide:
    """One generation's grammar state: ``mask`` the logits, then ``accept`` the token."""

    def __init__(self, matcher: llg.LLMatcher, n_vocab: int):
        self.m = matcher
        self.n_vocab = n_vocab
        self._bits = np.zeros((n_vocab + 31) // 32, dtype=np.int32)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of ``logits`` with every forbidden token at -inf."""
        m = self.m
        # llguidance writes one bit per token straight into our buffer (the GIL released)
        m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        allowed = np.unpackbits(self._bits.view(np.uint8), count=self.n_vocab,
                                bitorder="little").view(bool)
        x = np.asarray(logits, dtype=np.float32).reshape(-1)
        return np.where(allowed, x[:self.n_vocab], np.float32(-np.inf))

    def accept(self, token: int) -> None:
        # a token outside the mask (none reach here) would leave the matcher in its error
        # state, whose mask allows only EOS: the generation then ends
        self.m.consume_token(token)


class _Switching:
    """A guide that watches tokens until it switches on a guide (``active``), which then
    masks and accepts alone."""

    active = None

    def mask(self, logits: np.ndarray) -> np.ndarray:
        return logits if self.active is None else self.active.mask(logits)

    def accept(self, token: int) -> None:
        if self.active is not None:
            self.active.accept(token)
        else:
            self.watch(token)


class LazyGuide(_Switching):
    """Free text until ``trigger`` is written at a token boundary (``at_start``: only as the
    first thing written), then ``constraint``'s grammar, which must itself begin with the
    trigger, enforced from there on. If the text from the trigger does not fit the grammar,
    the text stays free."""

    def __init__(self, constraint: Constraint, trigger: str, at_start: bool = False):
        self.constraint = constraint
        self.trigger = trigger.encode()
        self.at_start = at_start
        self.tok = constraint.tokenizer
        self.pieces: list[bytes] = []
        self.tokens: list[int] = []
        self.active: Guide | None = None
        self.closed = False

    def watch(self, token: int) -> None:
        if self.closed:
            return
        piece = self.tok.token_bytes(token, special=True)
        self.tokens.append(token)
        self.pieces.append(piece)
        if self.at_start:
            text = b"".join(self.pieces).lstrip()
            if len(text) < len(self.trigger) and self.trigger.startswith(text):
                return   # the message has not begun (or not yet past the trigger)
            self.closed = True   # it has begun: with the trigger, or never
            if text.startswith(self.trigger):
                self._start(len(self.tokens))
            return
        tail = b""
        for k in range(1, len(self.pieces) + 1):
            tail = self.pieces[-k] + tail
            if len(tail) - len(piece) >= len(self.trigger):
                return   # the trigger would have completed before this token
            if tail.startswith(self.trigger):
                self._start(k)
                return

    def _start(self, k: int) -> None:
        m = self.constraint.matcher()
        if m.consume_tokens(self.tokens[-k:]):
            self.active = Guide(m, self.tok.n_vocab)
        self.tokens, self.pieces = [], []


class FirstOf(_Switching):
    """Several lazy guides watching the same text: the first to switch on rules alone."""

    def __init__(self, guides: list[LazyGuide]):
        self.guides = guides
        self.active: LazyGuide | None = None

    def watch(self, token: int) -> None:
        for g in self.guides:
            g.accept(token)
            if g.active is not None:
                self.active = g
                return
