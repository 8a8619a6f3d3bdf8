"""A Hugging Face ``tokenizers`` JSON stored in GGUF metadata (``tokenizer.huggingface.json``),
run by the ``tokenizers`` package itself, for models whose tokenizer llama.cpp has no type for
(EmbBERT-Q: BertNormalizer, whitespace split, plain BPE without prefixes or byte fallback).

Only the JSON's pipeline runs; its post-processor is not applied. Whether a leading
``tokenizer.ggml.bos_token_id`` ([CLS]) is added is the model's ``tokenizer.ggml.add_bos_token``
flag. Added tokens such as ``[SEP]`` are matched in the raw text, as the JSON defines them.
"""
from __future__ import annotations

HF_JSON_KEY = "tokenizer.huggingface.json"


class HFTokenizer:
    def __init__(self, json_text: str, add_bos: bool, bos_id: int | None):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError("this model's tokenizer needs the 'tokenizers' package "
                             "(pip install tokenizers); token ids work without it") from None
        try:
            self._tok = Tokenizer.from_str(json_text)
        except Exception as e:   # the library raises its own exception type
            raise ValueError(f"broken {HF_JSON_KEY} in the model: {e}") from None
        if add_bos and bos_id is None:
            raise ValueError("tokenizer.ggml.add_bos_token is set but there is no bos_token_id")
        self.add_bos, self.bos_id = add_bos, bos_id

    @classmethod
    def from_metadata(cls, meta: dict) -> "HFTokenizer":
        bos = meta.get("tokenizer.ggml.bos_token_id")
        return cls(meta[HF_JSON_KEY], bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                   None if bos is None else int(bos))

    @property
    def n_vocab(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds [CLS] if the model asks for it. The JSON's
        added tokens are always matched (``parse_special`` is accepted for the common API)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_special and self.add_bos else ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)
