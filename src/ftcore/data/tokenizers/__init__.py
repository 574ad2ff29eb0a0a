"""Tokenizers, instantiated from config, e.g. `_component_: ftcore.data.tokenizers.Llama3Tokenizer`.

    Llama3Tokenizer(path, max_seq_len=None)                          tiktoken rank file (Llama 3.x)
    SentencePieceTokenizer(path, chat_format="llama2", max_seq_len=None)  Llama 2 / Mistral .model
    HFTokenizer(path, chat_format="chatml", max_seq_len=None)        byte-level BPE tokenizer.json (Qwen2.5)
    GGUFTokenizer / gguf_tokenizer(path)                             vocabulary inside a .gguf file

The contract they share is `ftcore.data.tokenizers.base.Tokenizer` (docs/tokenizers.md).
"""

from __future__ import annotations

import importlib
from typing import Any

from ftcore.data.tokenizers.base import Tokenizer, check_vocab_matches
from ftcore.data.tokenizers.hf_json import HFChatFormat, HFTokenizer
from ftcore.data.tokenizers.llama3 import Llama3Tokenizer
from ftcore.data.tokenizers.sentencepiece import ChatFormat, SentencePieceTokenizer

# The GGUF tokenizer lives in its own module (ftcore.data.tokenizers.gguf), imported on first use so
# that this package imports without it.
_LAZY_GGUF_NAMES = ("GGUFTokenizer", "gguf_tokenizer")

__all__ = [
    "ChatFormat",
    "HFChatFormat",
    "HFTokenizer",
    "Llama3Tokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "check_vocab_matches",
    *_LAZY_GGUF_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY_GGUF_NAMES:
        try:
            module = importlib.import_module("ftcore.data.tokenizers.gguf")
        except ModuleNotFoundError as error:
            if error.name != "ftcore.data.tokenizers.gguf":
                raise  # the module exists but one of its own imports is missing: show that
            raise AttributeError(
                f"{name} needs ftcore.data.tokenizers.gguf, which is not installed"
            ) from error
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
