"""BERT WordPiece ("bert" in ``tokenizer.ggml.model``), as Hugging Face's tokenizers runs it.

Three stages, each as ``BertNormalizer`` / ``BertPreTokenizer`` / ``WordPiece`` do them:

1. normalize: drop NUL, U+FFFD and control/format characters, map any whitespace to a space,
   put spaces around CJK ideographs, then (when lowercasing) strip accents (NFD, drop Mn) and
   lowercase one character at a time (no final-sigma rule, unlike ``str.lower``);
2. split on whitespace, and make every punctuation character (Unicode P*, or ASCII symbols
   such as ``$+<=>^`|~``) a word of its own;
3. greedy longest-match-first WordPiece per word; a word with an unmatchable rest, or longer
   than 100 characters, is one ``[UNK]``.

The GGUF vocabulary is stored the way llama.cpp's converter writes it: a word-initial piece
``x`` as ``"\u2581x"``, a continuation ``##x`` as ``"x"``, control tokens unchanged.
"""
from __future__ import annotations

import unicodedata

PHANTOM = "\u2581"
MAX_WORD_CHARS = 100   # WordPiece's max_input_chars_per_word


def _is_control(ch: str) -> bool:
    if ch in "\t\n\r":
        return False
    return unicodedata.category(ch)[0] == "C"


def _is_cjk(cp: int) -> bool:
    # the ideograph blocks BertNormalizer pads with spaces (kana and hangul are not among them)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B920 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def _is_punct(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch)[0] == "P"


def normalize(text: str, lowercase: bool = True, strip_accents: bool | None = None) -> str:
    """BertNormalizer(clean_text, handle_chinese_chars, strip_accents, lowercase);
    ``strip_accents=None`` follows ``lowercase``, as in BERT."""
    out = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or _is_control(ch):
            continue
        if ch.isspace():
            out.append(" ")
        elif _is_cjk(cp):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    s = "".join(out)
    if lowercase if strip_accents is None else strip_accents:
        s = "".join(c for c in unicodedata.normalize("NFD", s) if unicodedata.category(c) != "Mn")
    if lowercase:
        s = "".join(c.lower() for c in s)
    return s


def pre_split(text: str) -> list[str]:
    """BertPreTokenizer on normalized text: whitespace-separated words, punctuation split off."""
    words: list[str] = []
    cur: list[str] = []
    for ch in text:
        if ch.isspace():
            if cur:
                words.append("".join(cur))
                cur = []
        elif _is_punct(ch):
            if cur:
                words.append("".join(cur))
                cur = []
            words.append(ch)
        else:
            cur.append(ch)
    if cur:
        words.append("".join(cur))
    return words


def word_ids(word: str, vocab: dict[str, int], unk: int) -> list[int]:
    """Greedy longest-match-first pieces of one word (phantom-space vocabulary)."""
    n = len(word)
    if n > MAX_WORD_CHARS:
        return [unk]
    out = []
    start = 0
    while start < n:
        prefix = PHANTOM if start == 0 else ""
        for end in range(n, start, -1):
            tid = vocab.get(prefix + word[start:end])
            if tid is not None:
                out.append(tid)
                start = end
                break
        else:
            return [unk]
    return out


class WordPiece:
    """The WordPiece model of a GGUF vocabulary; ``encode`` handles one raw-text fragment."""

    def __init__(self, vocab: dict[str, int], unk: int, lowercase: bool = True,
                 strip_accents: bool | None = None):
        self.vocab, self.unk = vocab, unk
        self.lowercase, self.strip_accents = lowercase, strip_accents
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str, out: list[int]) -> None:
        cache = self._cache
        for word in pre_split(normalize(text, self.lowercase, self.strip_accents)):
            ids = cache.get(word)
            if ids is None:
                ids = word_ids(word, self.vocab, self.unk)
                if len(cache) < 1 << 17:
                    cache[word] = ids
            out.extend(ids)
