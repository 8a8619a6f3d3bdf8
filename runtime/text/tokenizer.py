"""Tokenizers built from GGUF metadata that reproduce llama.cpp token for token.

Three tokenizer models are supported, as llama.cpp names them in ``tokenizer.ggml.model``:

* ``gpt2`` (and ``gemma4``): byte-level BPE. The text is cut into words by the pre-tokenizer
  regexes that llama.cpp picks from ``tokenizer.ggml.pre``, each word is byte-encoded and
  merged by rank.
* ``bert``: WordPiece with BERT's normalizer (``runtime.wordpiece``); [CLS] and [SEP] added.
* ``llama``: SentencePiece as llama.cpp runs it: spaces escaped to U+2581, bigrams merged by
  score, unknown characters falling back to ``<0xXX>`` byte tokens.

Matching llama.cpp exactly means copying its quirks, not the upstream tokenizers':

* Its regex engine sees one "category byte" per code point: ``\\p{L}`` is every letter (so
  ``\\p{Lu}`` is too), ``\\s`` is its own whitespace set, and code points come from its
  Unicode 15.1 tables. We rebuild that collapsed text and run Python's ``re`` on it.
* Special tokens are cut out of the text before anything else, longest first; user-defined
  tokens always, control/unknown tokens only when ``parse_special`` is true.
* BOS/EOS are added by the model's flags, never merged with ones written in the text.
"""
from __future__ import annotations

import array
import bisect
import heapq
import re
import unicodedata
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = ["Tokenizer", "UnsupportedTokenizer", "pre_split", "ATTR_UNKNOWN", "ATTR_UNUSED",
           "ATTR_NORMAL", "ATTR_CONTROL", "ATTR_USER_DEFINED", "ATTR_BYTE"]


class UnsupportedTokenizer(ValueError):
    """The GGUF names a tokenizer model or pre-tokenizer this module does not implement: a
    property of the file, reported as a one-line error like any other bad file."""


# --- token attributes (llama_token_attr) --------------------------------------------------

ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8

# GGUF token_type (0..6) -> attribute; anything else is "undefined" (0)
_TYPE_TO_ATTR = np.array([0, ATTR_NORMAL, ATTR_UNKNOWN, ATTR_CONTROL, ATTR_USER_DEFINED,
                          ATTR_UNUSED, ATTR_BYTE], dtype=np.int32)
_SPECIAL_ATTRS = ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN

# --- llama.cpp's view of Unicode --------------------------------------------------------------

# llama.cpp's whitespace set: Python's str.isspace() minus the ASCII separators 0x1C-0x1F.
_WHITESPACE = frozenset([9, 10, 11, 12, 13, 32, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
                         0x2028, 0x2029, 0x202F, 0x205F, 0x3000])

# Code points unassigned in older Python Unicode databases (3.11 ships 14.0) but assigned in
# llama.cpp's 15.1 tables, with their major category. Only consulted for category "Cn".
_UNICODE_15 = (
    "CF3M ECEM 2FFC-2FFFS 31EFS 10EFD-10EFFM 1123F-11240L 11241M 11B00-11B09P 11F00-11F01M "
    "11F02L 11F03M 11F04-11F10L 11F12-11F33L 11F34-11F3AM 11F3E-11F42M 11F43-11F4FP "
    "11F50-11F59N 1342FL 13439-1343FC 13440M 13441-13446L 13447-13455M 1B132L 1B155L "
    "1D2C0-1D2D3N 1DF25-1DF2AL 1E030-1E06DL 1E08FM 1E4D0-1E4EBL 1E4EC-1E4EFM 1E4F0-1E4F9N "
    "1F6DCS 1F774-1F776S 1F77B-1F77FS 1F7D9S 1FA75-1FA77S 1FA87-1FA88S 1FAAD-1FAAFS "
    "1FABB-1FABDS 1FABFS 1FACE-1FACFS 1FADA-1FADBS 1FAE8S 1FAF7-1FAF8S 2B739L 2EBF0-2EE5DL "
    "31350-323AFL")


def _parse_unicode_15() -> list[tuple[int, int, str]]:
    out = []
    for item in _UNICODE_15.split():
        lo, _, hi = item[:-1].partition("-")
        out.append((int(lo, 16), int(hi or lo, 16), item[-1]))
    return out


_UNICODE_15_RANGES = _parse_unicode_15()

# one stand-in character per category, as llama.cpp's unicode_regex_split collapses text
_CATEGORY_CHAR = {"N": "\xd1", "L": "\xd2", "P": "\xd3", "M": "\xd4", "S": "\xd5"}
_OTHER_CHAR = "\xd0"


def _major_category(cp: int) -> str:
    cat = unicodedata.category(chr(cp))
    if cat == "Cn":
        for lo, hi, major in _UNICODE_15_RANGES:
            if lo <= cp <= hi:
                return major
        return "?"
    return cat[0]


class _CollapseMap(dict):
    """str.translate table: ASCII kept, other code points -> their category stand-in."""

    def __missing__(self, cp: int) -> str:
        if cp < 128:
            ch = chr(cp)
        elif cp in _WHITESPACE:
            ch = "\x0b"
        else:
            ch = _CATEGORY_CHAR.get(_major_category(cp), _OTHER_CHAR)
        self[cp] = ch
        return ch


_COLLAPSE = _CollapseMap()
# regexes without \p{..} see the real code points, with non-ASCII whitespace as \x0b
_WIDE = {cp: "\x0b" for cp in _WHITESPACE if cp > 127}

_UCAT = {r"\p{N}": "N", r"\p{L}": "L", r"\p{P}": "P", r"\p{M}": "M", r"\p{S}": "S",
         r"\p{Lu}": "L", r"\p{Ll}": "L", r"\p{Lt}": "L", r"\p{Lm}": "L", r"\p{Lo}": "L"}
# stand-in plus the ASCII members of each category
_UCAT_CLASS = {
    "N": "\xd1" + "0-9",
    "L": "\xd2" + "A-Za-z",
    "P": "\xd3" + r"!-#%-*,-/:-;?-@\[-\]_\{\}",
    "M": "\xd4",
    "S": "\xd5" + r"\$\+<->\^`\|~",
}


def _collapse_regex(expr: str) -> str:
    """Rewrite ``\\p{X}`` into classes over the collapsed alphabet, as llama.cpp does."""
    out, inside, i = [], False, 0
    while i < len(expr):
        c = expr[i]
        if c == "[" and (i == 0 or expr[i - 1] != "\\"):
            out.append(c)
            inside = True
        elif inside and c == "]" and expr[i - 1] != "\\":
            out.append(c)
            inside = False
        elif expr.startswith("\\p{", i):
            j = expr.find("}", i + 3)
            key = expr[i:j + 1] if j != -1 and j <= i + 10 else ""
            if key in _UCAT:
                body = _UCAT_CLASS[_UCAT[key]]
                out.append(body if inside else "[" + body + "]")
                i = j + 1
                continue
            out.append(c)
        else:
            out.append(c)
        i += 1
    return "".join(out)


def _compile_step(expr: str) -> tuple[re.Pattern, bool]:
    """Compile one llama.cpp pre-tokenizer regex; returns (pattern, runs_on_collapsed_text)."""
    collapsed = any(k in expr for k in _UCAT)
    if collapsed:
        expr = _collapse_regex(expr)
    if expr.endswith("$") and not expr.endswith("\\$"):
        expr = expr[:-1] + r"\Z"  # ECMAScript '$' never matches before a final newline
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "possible nested set" in literal classes
        return re.compile(expr, re.ASCII), collapsed


# The regexes llama.cpp runs for each pre-tokenizer (llm_tokenizer_bpe), in their adapted form.
_GPT2_RE = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
_LLAMA3_RE = ("(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?"
              "\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2_RE = ("(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?"
             "\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT4O_RE = ("[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+" + _CONTRACTIONS
             + "?|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*"
             + _CONTRACTIONS + "?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+"
             "|\\s+(?!\\S)|\\s+")
_DEEPSEEK3_WORDS = ("[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+"
                    "|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+")
_CJK_KANA = "[一-龥\u3040-ゟ゠-ヿ]+"
_PORO_RE = " ?[^(\\s|.,!?…。，、।۔،)]+"
_NEWLINES_RE = "[^\\n]+|[\\n]+"

_PRE_REGEXES: dict[str, list[str]] = {
    "default": ["[\\p{P}\\$\\+<=>\\^~\\|]+", _GPT2_RE, "\\p{N}+", "[0-9][0-9][0-9]"],
    "gpt2": [_GPT2_RE],
    "starcoder": ["\\p{N}", _GPT2_RE],
    "falcon": ["[\\p{P}\\$\\+<=>\\^~\\|`]+", _GPT2_RE, "[0-9][0-9][0-9]"],
    "llama3": [_LLAMA3_RE],
    "qwen2": [_QWEN2_RE],
    "qwen35": [_CONTRACTIONS + "|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}"
               "| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"],
    "deepseek-llm": [
        "[\r\n]",
        "\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
        "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1"
        "\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8"
        "-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-"
        "\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-"
        "\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-"
        "\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-"
        "\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149"
        "\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
        "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13"
        "-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
        "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
        "\U0001e900-\U0001e943]+",
        "\\s?[!-/:-~！-／：-～‘-‟\u3000-。]+",
        "\\s+$",
        "[一-龥ࠀ-一가-\ud7ff]+",
        "\\p{N}+",
    ],
    "deepseek-coder": ["[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", "[一-龥ࠀ-一가-\ud7ff]+",
                       "\\p{N}"],
    "deepseek3": ["\\p{N}{1,3}", _CJK_KANA,
                  _DEEPSEEK3_WORDS + "[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"],
    "spark2_5": ["\\p{N}{1,3}", _CJK_KANA,
                 _DEEPSEEK3_WORDS + "|[\r\n]|\\s+(?!\\S)|\\s+", "\\p{N}"],
    "poro": [_PORO_RE],
    "viking": [_PORO_RE, "\\p{N}"],
    "tekken": ["[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+|[^\\r\\n\\p{L}"
               "\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
               "[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"],
    "gpt4o": [_GPT4O_RE],
    "bailingmoe": ["'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+"
                   "|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+"],
    "seed-coder": [_CONTRACTIONS + "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1}"
                   "| ?[^\\s\\p{L}\\p{N}\\r\\n]+|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"],
    "ufakzeka": ["[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+"
                 "|\\s+(?!\\S)|\\s+"],
    "laguna": [_NEWLINES_RE, _QWEN2_RE],
    "exaone-moe": [_CONTRACTIONS + "|[^\\r\\n\\p{L}\\p{N}]?(?:\\p{L}\\p{M}*(?: \\p{L}\\p{M}*)*)+"
                   "|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]?|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+"],
    "minicpm5": ["\\p{N}{1,3}", _CONTRACTIONS + "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}+"
                 "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"],
    "newlines": [_NEWLINES_RE],
}

# tokenizer.ggml.pre -> (regex set, clean_spaces, ignore_merges, default add_bos or None)
_PRE = {}


def _pre(names: str, regexes: str, clean: bool = True, ignore_merges: bool = False,
         add_bos: bool | None = None) -> None:
    for name in names.split():
        _PRE[name] = (regexes, clean, ignore_merges, add_bos)


_pre("default", "default")
_pre("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano", "llama3",
     ignore_merges=True, add_bos=True)
_pre("dbrx smaug-bpe chatglm-bpe", "llama3")
_pre("glm4 glm5", "llama3", ignore_merges=True)
_pre("deepseek-llm", "deepseek-llm", clean=False)
_pre("deepseek-coder", "deepseek-coder", clean=False)
_pre("deepseek-v3 hunyuan-dense hy_v4 joyai-llm", "deepseek3", clean=False)
_pre("spark2_5", "spark2_5", clean=False)
_pre("falcon", "falcon")
_pre("mpt gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert "
     "jina-v1-en jina-v2-code roberta-bpe olmo jais exaone4", "gpt2")
_pre("trillion granite-docling", "gpt2", clean=False)
_pre("starcoder refact codeshell exaone minerva-7b mellum2", "starcoder")
_pre("command-r smollm", "starcoder", clean=False)
_pre("qwen2 deepseek-r1-qwen kormo f2llmv2 hunyuan solar-open grok-2", "qwen2", clean=False)
_pre("stablelm2 megrez", "qwen2")
_pre("qwen35", "qwen35", clean=False)
_pre("poro-chat", "poro", clean=False)
_pre("bloom gpt3-finnish", "poro")
_pre("viking", "viking", clean=False)
_pre("tekken", "tekken", clean=False, ignore_merges=True, add_bos=True)
_pre("gpt-4o llama4 kanana2 talkie minimax-m2", "gpt4o", clean=False)
_pre("bailingmoe bailingmoe2 llada-moe", "bailingmoe", clean=False)
_pre("seed-coder", "seed-coder", clean=False)
_pre("ufakzeka", "ufakzeka", clean=False)
_pre("laguna", "laguna", clean=False)
_pre("exaone-moe", "exaone-moe")
_pre("minicpm5", "minicpm5", ignore_merges=True)
_pre("gemma4 granite-embed-multi-311m", "newlines")
_pre("sarvam-moe", "newlines", clean=False)

_COMPILED: dict[str, list[tuple[re.Pattern, bool]]] = {}


def _steps(regex_set: str) -> list[tuple[re.Pattern, bool]]:
    if regex_set not in _COMPILED:
        exprs = []
        for e in _PRE_REGEXES[regex_set]:
            if e == _GPT2_RE:
                e += "|\\s+"  # llama.cpp's hand-written GPT-2 splitter also takes lone spaces
            exprs.append(e)
        _COMPILED[regex_set] = [_compile_step(e) for e in exprs]
    return _COMPILED[regex_set]


def pre_split(text: str, pre: str = "default") -> list[str]:
    """Words that the BPE pre-tokenizer ``pre`` (a ``tokenizer.ggml.pre`` value) cuts from ``text``.

    The words are the original text; the model byte-encodes them before merging.
    """
    if pre not in _PRE:
        raise UnsupportedTokenizer(f"pre-tokenizer {pre!r} is not supported")
    return _split(text, _steps(_PRE[pre][0]))


def _split(text: str, steps: Sequence[tuple[re.Pattern, bool]]) -> list[str]:
    # each regex splits the pieces the previous one left; the unmatched stretches between
    # matches are words too, as in llama.cpp's unicode_regex_split
    n = len(text)
    if n == 0:
        return []
    spans = [(0, n)]
    collapsed = wide = None
    for pattern, use_collapsed in steps:
        if use_collapsed:
            if collapsed is None:
                collapsed = text.translate(_COLLAPSE)
            s = collapsed
        else:
            if wide is None:
                wide = text.translate(_WIDE)
            s = wide
        out = []
        for a, b in spans:
            last = a
            for m in pattern.finditer(s, a, b):
                st, en = m.span()
                if st > last:
                    out.append((last, st))
                if en > st:
                    out.append((st, en))
                last = en
            if last < b:
                out.append((last, b))
        spans = out
    return [text[a:b] for a, b in spans]


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable character table."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return [table[b] for b in range(256)]


_BYTE_CHARS = _bytes_to_unicode()
_BYTE_ENCODE = {i: c for i, c in enumerate(_BYTE_CHARS)}  # translate table over latin-1 text
_BYTE_DECODE = {c: i for i, c in enumerate(_BYTE_CHARS)}
_SPACE_ESCAPE = "\u2581"
_ISSPACE = " \t\n\v\f\r"  # C isspace(), used by LSTRIP/RSTRIP

# token texts llama.cpp treats as end-of-turn / end-of-generation (llama_vocab::impl::load)
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>",
              "<end_of_utterance>")
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>",
              "<|calls|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>",
              "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>", "<end_of_utterance>", "<eos>",
              "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[")
_FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
                "▁<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
                "▁<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
                "▁<MID>", "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_SPECIAL_KEYS = {
    "bos": "bos_token_id", "eos": "eos_token_id", "eot": "eot_token_id", "eom": "eom_token_id",
    "unk": "unknown_token_id", "sep": "seperator_token_id", "pad": "padding_token_id",
    "mask": "mask_token_id", "fim_pre": "fim_pre_token_id", "fim_suf": "fim_suf_token_id",
    "fim_mid": "fim_mid_token_id", "fim_pad": "fim_pad_token_id", "fim_rep": "fim_rep_token_id",
    "fim_sep": "fim_sep_token_id",
}
_DEPRECATED_FIM_KEYS = {"fim_pre": "prefix_token_id", "fim_suf": "suffix_token_id",
                        "fim_mid": "middle_token_id"}

_WORD_CACHE_MAX = 1 << 17


class Tokenizer:
    """A llama.cpp-compatible tokenizer (``llama_tokenize`` / ``llama_detokenize``).

    Build it with :meth:`load` (any GGUF, vocab-only ones too) or :meth:`from_metadata`.
    """

    def __init__(self, meta: dict):
        model = str(meta.get("tokenizer.ggml.model", ""))
        pre = meta.get("tokenizer.ggml.pre")
        pre = None if pre is None else str(pre)
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise UnsupportedTokenizer("GGUF has no tokenizer.ggml.tokens")
        if model not in ("llama", "gpt2", "gemma4", "bert"):
            raise UnsupportedTokenizer(f"tokenizer model {model!r} is not supported")
        self.model = model
        self.kind = {"llama": "spm", "bert": "wpm"}.get(model, "bpe")
        n = len(tokens)

        # vocabulary: empty strings renamed and later duplicates winning, as llama.cpp does
        texts = list(tokens)
        if "" in texts:
            texts = [t or f"[EMPTY_{i}]" for i, t in enumerate(texts)]
        self._texts = texts
        self._vocab: dict[str, int] = dict(zip(texts, range(n)))
        scores = meta.get("tokenizer.ggml.scores")
        # packed floats: a list of Python floats costs 32 bytes a token (8 MiB for Gemma's)
        self._scores = (array.array("f", np.asarray(scores, dtype=np.float32)[:n].tobytes())
                        if scores is not None else None)
        ttype = meta.get("tokenizer.ggml.token_type")
        if ttype is None:
            attrs = np.full(n, ATTR_NORMAL, dtype=np.int32)
        else:
            tt = np.asarray(ttype, dtype=np.int64)[:n]
            attrs = np.where((tt >= 0) & (tt < len(_TYPE_TO_ATTR)),
                             _TYPE_TO_ATTR[np.clip(tt, 0, len(_TYPE_TO_ATTR) - 1)], 0)
            attrs = attrs.astype(np.int32)

        # flags and defaults per tokenizer model
        self.add_space_prefix = False
        self.escape_whitespaces = False
        self.clean_spaces = False
        self.ignore_merges = False
        self.byte_encode = True
        self.add_bos = False
        self.add_eos = False
        ids = dict.fromkeys(list(_SPECIAL_KEYS), None)
        self._ranks: dict[str, int] = {}
        self._steps: list[tuple[re.Pattern, bool]] = []
        if self.kind == "spm":
            ids.update(bos=1, eos=2, unk=0)
            self.add_space_prefix = True
            self.escape_whitespaces = True
            self.add_bos = True
            self.pre = "default"
        elif self.kind == "wpm":
            # llama.cpp's defaults; encode adds [CLS] ... [SEP] whatever add_bos/add_eos say
            ids.update(bos=101, unk=100, sep=102, pad=0, mask=103)
            self.add_bos = True
            self.clean_spaces = True
            self.escape_whitespaces = True   # decoding: U+2581 word starts become spaces
            self.pre = pre or "default"
        else:
            if model == "gemma4":
                pre = "gemma4"
            else:
                ids.update(bos=11, eos=11)
            self.pre = pre or "default"
            if self.pre not in _PRE:
                raise UnsupportedTokenizer(f"pre-tokenizer {self.pre!r} is not supported")
            regex_set, self.clean_spaces, self.ignore_merges, add_bos = _PRE[self.pre]
            if add_bos is not None:
                self.add_bos = add_bos
            if regex_set == "newlines":
                self.byte_encode = False
                self.escape_whitespaces = True
            if self.pre in ("chatglm-bpe", "glm4", "glm5"):
                ids["bos"] = None
            self._steps = _steps(regex_set)
            merges = meta.get("tokenizer.ggml.merges")
            if merges is None:
                raise UnsupportedTokenizer("BPE vocabulary without tokenizer.ggml.merges")
            # "left right" -> rank; the first of duplicate merges wins (unordered_map::emplace)
            m = len(merges)
            self._ranks = dict(zip(reversed(merges), range(m - 1, -1, -1)))
        v = meta.get("tokenizer.ggml.add_space_prefix")
        if v is not None:
            self.add_space_prefix = bool(v)

        # special ids: defaults out of range are disabled, bad metadata ids keep the default
        for key in ids:
            if ids[key] is not None and ids[key] >= n:
                ids[key] = None
        for key, name in list(_SPECIAL_KEYS.items()) + list(_DEPRECATED_FIM_KEYS.items()):
            v = meta.get("tokenizer.ggml." + name)
            if v is not None and 0 <= int(v) < n:
                ids[key] = int(v)
        for flag in ("add_bos", "add_eos"):
            v = meta.get(f"tokenizer.ggml.{flag}_token")
            if v is not None:
                setattr(self, flag, bool(v))
        if self.pre == "gemma4":
            self.add_bos = True

        self._derive_special_tokens(ids, attrs)
        self._attrs = attrs.tolist()
        # matched longest (in bytes) first
        self._special_ids = sorted(
            (int(i) for i in np.flatnonzero(attrs & _SPECIAL_ATTRS)),
            key=lambda i: -len(texts[i].encode("utf-8", "surrogateescape")))
        self._apply_name_rules(meta)

        self._pieces: list[bytes | None] = [None] * n
        if self.kind == "wpm":
            from pocketlm.text.wordpiece import WordPiece
            self._wpm = WordPiece(self._vocab, self._need("unk"),
                                  bool(meta.get("tokenizer.ggml.normalizer.lowercase", True)),
                                  meta.get("tokenizer.ggml.normalizer.strip_accents"))
        self._cache: dict[str, tuple[int, ...]] = {}
        self._spm_crossing: list[str] | None = None

    # --- construction -----------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Read the tokenizer of a GGUF file (full model or vocab-only)."""
        from pocketlm.gguf.reader import open_gguf
        g = open_gguf(path)
        try:
            return cls(g.metadata)
        finally:
            close = getattr(g, "close", None)
            if close is not None:
                close()

    @classmethod
    def from_metadata(cls, meta: dict) -> "Tokenizer":
        """Build from a GGUF metadata dict (``tokenizer.ggml.*`` keys, ``general.name``)."""
        return cls(meta)

    def _derive_special_tokens(self, ids: dict, attrs: np.ndarray) -> None:
        """EOT/EOM/FIM/EOG detection by token text, with llama.cpp's attribute fix-ups."""
        vocab = self._vocab

        def mark_control(tid: int) -> None:
            attrs[tid] |= ATTR_CONTROL

        # llama.cpp picks the first match in hash order; we take the first in its list order
        for key, names in (("eot", _EOT_TEXTS), ("eom", ("<|eom_id|>",)), *_FIM_TEXTS.items()):
            if ids[key] is None:
                for name in names:
                    tid = vocab.get(name)
                    if tid is not None:
                        ids[key] = tid
                        mark_control(tid)
                        break
        control = np.flatnonzero((attrs & ATTR_CONTROL) != 0)
        for tid in control:
            if "unused" in self._texts[tid]:
                attrs[tid] |= ATTR_UNUSED

        eog = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if ids[k] is not None}
        for name in _EOG_TEXTS:
            tid = vocab.get(name)
            if tid is not None:
                eog.add(tid)
                mark_control(tid)
        for name in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
            tid = vocab.get(name)
            if tid is not None:
                attrs[tid] = ATTR_USER_DEFINED
        for key in ("eos", "eot", "eom"):
            if ids[key] is not None:
                eog.add(ids[key])
        eog_texts = {self._texts[t] for t in eog}
        end_id = vocab.get("<|end|>")
        has_call = bool({"<|call|>", "<|calls|>"} & eog_texts)
        if end_id in eog and has_call and ({"<|return|>", "<|flush|>"} & eog_texts):
            eog.discard(end_id)
            attrs[end_id] = ATTR_USER_DEFINED
        s_id = vocab.get("</s>")
        if s_id in eog and ({"<|tool_response>", "<|plamo:eos|>"} & eog_texts):
            eog.discard(s_id)
            attrs[s_id] = ATTR_NORMAL
        self._ids = ids
        self._eog = frozenset(eog)

    def _apply_name_rules(self, meta: dict) -> None:
        """Per-model LSTRIP/RSTRIP attributes llama.cpp sets from the model's name."""
        name = str(meta.get("general.name", "")).lower()
        arch = str(meta.get("general.architecture", ""))
        pre = str(meta.get("tokenizer.ggml.pre", ""))
        vocab, a = self._vocab, self._attrs

        def setattr_(tid, flag, on):
            a[tid] = (a[tid] | flag) if on else (a[tid] & ~flag)

        if any(s in pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or \
                any(s in arch for s in ("nomic-bert-moe", "jina-bert-v3")):
            if "<mask>" in vocab:
                setattr_(vocab["<mask>"], ATTR_LSTRIP, True)
        elif "phi-3" in name or "phi3" in name:
            for tid in self._special_ids:
                setattr_(tid, ATTR_RSTRIP, True)
            for t, on in (("</s>", True), ("<unk>", False), ("<s>", False),
                          ("<|endoftext|>", False)):
                if t in vocab:
                    setattr_(vocab[t], ATTR_RSTRIP, on)
        elif "modern-bert" in name and "[MASK]" in vocab:
            setattr_(vocab["[MASK]"], ATTR_LSTRIP, True)

    # --- properties ---------------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        """Number of tokens in the vocabulary."""
        return len(self._texts)

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or None."""
        return self._ids["bos"]

    @property
    def eos_id(self) -> int | None:
        """End-of-sequence id, or None."""
        return self._ids["eos"]

    @property
    def bos_text(self) -> str:
        """BOS token's text (e.g. ``<s>``), or "" if there is none; for chat templates."""
        return "" if self.bos_id is None else self._texts[self.bos_id]

    @property
    def eos_text(self) -> str:
        """EOS token's text, or "" if there is none; for chat templates."""
        return "" if self.eos_id is None else self._texts[self.eos_id]

    @property
    def eot_id(self) -> int | None:
        """End-of-turn id (metadata, else detected by text such as ``<|im_end|>``), or None."""
        return self._ids["eot"]

    @property
    def unk_id(self) -> int | None:
        """Unknown-token id, or None."""
        return self._ids["unk"]

    @property
    def pad_id(self) -> int | None:
        """Padding id, or None."""
        return self._ids["pad"]

    @property
    def eog_ids(self) -> frozenset[int]:
        """Every id that ends generation, as llama.cpp's ``llama_vocab_is_eog`` decides."""
        return self._eog

    stop_ids = eog_ids
    eot_ids = eog_ids

    def is_eog(self, token_id: int) -> bool:
        """True if ``token_id`` ends generation (EOS, EOT, ``<|im_end|>``, ...)."""
        return token_id in self._eog

    def token_attr(self, token_id: int) -> int:
        """llama.cpp's attribute bits for a token (``ATTR_*`` constants of this module)."""
        return self._attrs[token_id]

    def token_text(self, token_id: int) -> str:
        """The token's vocabulary string as stored in the GGUF."""
        return self._texts[token_id]

    def token_to_id(self, text: str) -> int | None:
        """Id of the vocabulary entry spelled exactly ``text``, or None."""
        return self._vocab.get(text)

    # --- encoding -----------------------------------------------------------------------

    @property
    def control_texts(self) -> list[str]:
        """Texts of the tokens that only ``parse_special`` matches (control and unknown)."""
        return [self._texts[t] for t in self._special_ids
                if self._attrs[t] & (ATTR_CONTROL | ATTR_UNKNOWN)]

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False,
               plain: Sequence[tuple[int, int]] = ()) -> list[int]:
        """Token ids for ``text``, as ``llama_tokenize(vocab, text, add_special, parse_special)``.

        ``add_special`` adds BOS/EOS where the model asks for them; ``parse_special`` lets
        control tokens written in the text (``<|im_start|>``, ``<bos>``) become their ids,
        except where they overlap a ``plain`` span (sorted, disjoint ``(start, end)`` offsets
        into ``text``). User-defined tokens are always matched.
        """
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8", "replace")
        fragments = self._partition(text, parse_special, plain) if text else []
        out: list[int] = []
        if self.kind == "spm":
            if add_special and self.add_bos:
                out.append(self._need("bos"))
            prev_special = True
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                    prev_special = True
                    continue
                piece = text[frag[0]:frag[1]]
                if self.add_space_prefix and prev_special:
                    piece = " " + piece
                self._encode_spm(piece.replace(" ", _SPACE_ESCAPE), out)
                prev_special = False
            if add_special and self.add_eos:
                out.append(self._need("eos"))
        elif self.kind == "wpm":
            if add_special:
                out.append(self._need("bos"))
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    self._wpm.encode(text[frag[0]:frag[1]], out)
            if add_special:
                out.append(self._need("sep"))
        else:
            if add_special and self.add_bos:
                out.append(self._need("bos"))
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                    continue
                piece = text[frag[0]:frag[1]]
                if self.escape_whitespaces:
                    piece = piece.replace(" ", _SPACE_ESCAPE)
                self._encode_bpe(piece, out)
            if add_special and self.add_eos:
                out.append(self._need("eos"))
        return out

    def _need(self, key: str) -> int:
        tid = self._ids[key]
        if tid is None:
            raise ValueError(f"model asks for a {key.upper()} token but defines none")
        return tid

    def _partition(self, text: str, parse_special: bool,
                   plain: Sequence[tuple[int, int]] = ()) -> list:
        """Cut special tokens out of ``text`` (llama.cpp's tokenizer_st_partition).

        Returns ``(start, end)`` spans of raw text and int token ids, in order.
        """
        frags: list = [(0, len(text))]
        attrs, texts = self._attrs, self._texts
        skip = 0 if parse_special else (ATTR_CONTROL | ATTR_UNKNOWN)
        plain_ends = [e for _, e in plain]

        def in_plain(m: int, size: int) -> bool:
            i = bisect.bisect_right(plain_ends, m)
            return i < len(plain) and plain[i][0] < m + size
        for tid in self._special_candidates(text):
            a = attrs[tid]
            if a & skip:
                continue
            tok = texts[tid]
            size = len(tok)
            if not any(isinstance(f, tuple) for f in frags):
                break
            out = []
            for frag in frags:
                if isinstance(frag, int):
                    out.append(frag)
                    continue
                pos, end = frag
                search = pos
                while True:
                    m = text.find(tok, search, end)
                    if m < 0:
                        break
                    if a & (ATTR_CONTROL | ATTR_UNKNOWN) and plain and in_plain(m, size):
                        search = m + 1  # written by a user: stays text
                        continue
                    left = m
                    if a & ATTR_LSTRIP:
                        while left > pos and text[left - 1] in _ISSPACE:
                            left -= 1
                    if left > pos:
                        out.append((pos, left))
                    out.append(tid)
                    pos = m + size
                    if a & ATTR_RSTRIP:
                        while pos < end and text[pos] in _ISSPACE:
                            pos += 1
                    search = pos
                if pos < end:
                    out.append((pos, end))
            frags = out
        return frags

    def _special_candidates(self, text: str) -> list[int]:
        """Special ids whose text occurs in ``text`` (longest first); skips hopeless scans."""
        texts = self._texts
        if len(text) <= 256 or len(self._special_ids) <= 64:
            return [t for t in self._special_ids if texts[t] in text]
        grams = {text[i:i + 3] for i in range(len(text) - 2)}
        out = []
        for t in self._special_ids:
            s = texts[t]
            if (s[:3] in grams if len(s) >= 3 else True) and s in text:
                out.append(t)
        return out

    def _encode_bpe(self, text: str, out: list[int]) -> None:
        cache = self._cache
        for word in _split(text, self._steps):
            ids = cache.get(word)
            if ids is None:
                ids = self._bpe_word(word)
                if len(cache) >= _WORD_CACHE_MAX:
                    cache.clear()
                cache[word] = ids
            out.extend(ids)

    def _bpe_word(self, word: str) -> tuple[int, ...]:
        vocab = self._vocab
        if self.byte_encode:
            raw = word.encode("utf-8", "surrogateescape")
            sym_text = raw.decode("latin-1").translate(_BYTE_ENCODE)
        else:
            sym_text = word
        if self.ignore_merges and sym_text in vocab:
            return (vocab[sym_text],)
        if self.pre == "gemma4" and not sym_text.strip("\n") and sym_text in vocab:
            return (vocab[sym_text],)
        syms = self._merge_bpe(sym_text)
        out = []
        for s in syms:
            tid = vocab.get(s)
            if tid is not None:
                out.append(tid)
                continue
            # llama.cpp looks up each byte of the symbol's UTF-8 spelling; misses are dropped
            for b in s.encode("utf-8", "surrogateescape"):
                key = (bytes([b]).decode("utf-8", "surrogateescape") if self.byte_encode
                       else f"<0x{b:02X}>")
                tid = vocab.get(key)
                if tid is not None:
                    out.append(tid)
        return tuple(out)

    def _merge_bpe(self, word: str) -> list[str]:
        """Merge adjacent symbols, lowest rank first and leftmost on ties (as llama.cpp's BPE)."""
        syms = list(word)
        n = len(syms)
        if n < 2:
            return syms
        ranks = self._ranks
        heap = []
        for i in range(n - 1):
            text = syms[i] + syms[i + 1]
            r = ranks.get(syms[i] + " " + syms[i + 1])
            if r is not None:
                heap.append((r, i, i + 1, text))
        if not heap:
            return syms
        heapq.heapify(heap)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        push = heapq.heappush
        while heap:
            _, left, right, text = heapq.heappop(heap)
            a, b = syms[left], syms[right]
            if not a or not b or a + b != text:
                continue
            syms[left] = text
            syms[right] = ""
            nr = nxt[right]
            nxt[left] = nr
            if nr >= 0:
                prev[nr] = left
            pl = prev[left]
            if pl >= 0:
                r = ranks.get(syms[pl] + " " + text)
                if r is not None:
                    push(heap, (r, pl, left, syms[pl] + text))
            if nr >= 0:
                r = ranks.get(text + " " + syms[nr])
                if r is not None:
                    push(heap, (r, left, nr, text + syms[nr]))
        return [s for s in syms if s]

    def _encode_spm(self, text: str, out: list[int]) -> None:
        if not text:
            return
        if self._spm_crossing is None:
            # words can be cut before a "x▁" boundary unless some token spans one
            self._spm_crossing = [t for t in self._texts
                                  if _SPACE_ESCAPE in t.lstrip(_SPACE_ESCAPE)]
        if any(t in text for t in self._spm_crossing):
            out.extend(self._spm_word(text))
            return
        cache = self._cache
        for m in re.finditer("\u2581*[^\u2581]+|\u2581+", text):
            word = m.group()
            ids = cache.get(word)
            if ids is None:
                ids = self._spm_word(word)
                if len(cache) >= _WORD_CACHE_MAX:
                    cache.clear()
                cache[word] = ids
            out.extend(ids)

    def _spm_word(self, text: str) -> tuple[int, ...]:
        """SentencePiece merge: best-scoring bigram first, leftmost on ties (llm_tokenizer_spm)."""
        vocab, scores = self._vocab, self._scores
        syms = list(text)
        n = len(syms)
        heap = []

        def bigram(left: int, right: int) -> None:
            t = syms[left] + syms[right]
            tid = vocab.get(t)
            if tid is not None:
                heapq.heappush(heap, (-(scores[tid] if scores else 0.0), left, right, len(t)))

        for i in range(1, n):
            bigram(i - 1, i)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        if n:
            nxt[-1] = -1
        while heap:
            _, left, right, size = heapq.heappop(heap)
            a, b = syms[left], syms[right]
            if not a or not b or len(a) + len(b) != size:
                continue
            syms[left] = a + b
            syms[right] = ""
            nr = nxt[right]
            nxt[left] = nr
            if nr >= 0:
                prev[nr] = left
            if prev[left] >= 0:
                bigram(prev[left], left)
            if nr >= 0:
                bigram(left, nr)
        out = []
        for s in syms:
            if not s:
                continue
            tid = vocab.get(s)
            if tid is not None:
                out.append(tid)
                continue
            for b in s.encode("utf-8", "surrogateescape"):
                tid = vocab.get(f"<0x{b:02X}>")
                if tid is None:
                    tid = vocab.get(bytes([b]).decode("utf-8", "surrogateescape"))
                if tid is None:
                    raise ValueError(f"no byte-fallback token for byte 0x{b:02X}")
                out.append(tid)
        return tuple(out)

    # --- decoding -----------------------------------------------------------------------

    def token_bytes(self, token_id: int, special: bool = False) -> bytes:
        """Raw bytes ``token_id`` contributes to decoded text (may be part of a UTF-8 char).

        With ``special=False`` control and unknown tokens contribute nothing, as in
        ``llama_token_to_piece(..., special=false)``; use it for incremental streaming.
        """
        a = self._attrs[token_id]
        if not special and a & (ATTR_UNKNOWN | ATTR_CONTROL):
            return b""
        piece = self._pieces[token_id]
        if piece is None:
            piece = self._pieces[token_id] = self._make_piece(token_id, a)
        return piece

    def _make_piece(self, tid: int, a: int) -> bytes:
        text = self._texts[tid]
        if a & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED):
            return text.encode("utf-8", "surrogateescape")
        if a & ATTR_NORMAL:
            if self.escape_whitespaces:
                return text.replace(_SPACE_ESCAPE, " ").encode("utf-8", "surrogateescape")
            out = bytearray()
            for ch in text:
                b = _BYTE_DECODE.get(ch)
                if b is not None:
                    out.append(b)
                else:
                    # llama_decode_text marks characters outside the byte table
                    out += b"[UNK_BYTE_0x" + ch.encode("utf-8", "surrogateescape").hex().encode()
                    out += text.encode("utf-8", "surrogateescape") + b"]"
            return bytes(out)
        if a & ATTR_BYTE:
            return bytes([int(text[3:5], 16)])
        return b""

    def token_to_piece(self, token_id: int, special: bool = True) -> str:
        """Text of one token (UTF-8 decoded with replacement; see :meth:`token_bytes`)."""
        return self.token_bytes(token_id, special).decode("utf-8", "replace")

    def decode_bytes(self, ids: Iterable[int], remove_special: bool = False,
                     unparse_special: bool = False) -> bytes:
        """Bytes of ``llama_detokenize(ids, remove_special, unparse_special)``."""
        ids = list(ids)
        remove_space = self.add_space_prefix
        if remove_special and self.add_bos and ids and ids[0] == self._ids["bos"]:
            remove_space = False
            ids = ids[1:]
        if remove_special and self.add_eos and ids and ids[-1] == self._ids["eos"]:
            ids = ids[:-1]
        parts = []
        for tid in ids:
            piece = self.token_bytes(tid, unparse_special)
            if remove_space and piece[:1] == b" ":
                piece = piece[1:]
            remove_space = False
            parts.append(piece)
        out = b"".join(parts)
        if self.clean_spaces and out:
            out = _clean_spaces(out)
        return out

    def decode(self, ids: Iterable[int], remove_special: bool = False,
               unparse_special: bool = False) -> str:
        """Text for ``ids`` as ``llama_detokenize``: by default control tokens (BOS, ...) give
        no text; ``unparse_special`` writes them out; ``remove_special`` drops a leading BOS /
        trailing EOS the model would have added.
        """
        return self.decode_bytes(ids, remove_special, unparse_special).decode("utf-8", "replace")

    def __repr__(self) -> str:
        return (f"Tokenizer(model={self.model!r}, pre={self.pre!r}, n_vocab={self.n_vocab}, "
                f"bos={self.bos_id}, eos={self.eos_id}, add_bos={self.add_bos})")


def _clean_spaces(text: bytes) -> bytes:
    """llama.cpp's clean_up_tokenization_spaces: three passes over the bytes."""
    # " ?", " !", " .", " ,": drop the space
    out = bytearray(text[:1])
    for i in range(1, len(text)):
        x = text[i]
        if text[i - 1] == 0x20 and x in b"?!.,":
            out.pop()
        out.append(x)
    # " ' ": drop both spaces around a lone apostrophe
    t = bytearray(out)
    out = bytearray(t[:1])
    i, n = 1, len(t)
    while i < n:
        x = t[i]
        if x == 0x27 and i + 1 < n and t[i - 1] == 0x20 and t[i + 1] == 0x20:
            out.pop()
            i += 1
            t[i] = 0
        out.append(x)
        i += 1
    # " 's", " 'm", " 're", " 've": drop the space
    t = bytes(out)
    out = bytearray(t[:1])
    n = len(t)
    for i in range(1, n):
        x = t[i]
        if t[i - 1] == 0x20 and x == 0x27 and i + 1 < n:
            x1 = t[i + 1]
            if x1 in b"sm":
                out.pop()
            elif x1 not in b"td" and i + 2 < n and (x1, t[i + 2]) in ((0x72, 0x65), (0x76, 0x65)):
                out.pop()
        out.append(x)
    return bytes(out)
