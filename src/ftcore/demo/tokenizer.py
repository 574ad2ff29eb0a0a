"""A character-level tokenizer for the embedded demo, with the same protocol as the real tokenizers."""

from __future__ import annotations

import string

from ftcore.data.messages import Message
from ftcore.data.tokenizers.base import concat_messages

_SPECIALS = ("<pad>", "<bos>", "<eos>")
_ALPHABET = string.ascii_lowercase + string.digits + " :=+-.,?!\n"


class CharTokenizer:
    """One id per character of a fixed alphabet; ids 0-2 are pad, bos and eos."""

    def __init__(self, alphabet: str = _ALPHABET):
        self._chars = list(_SPECIALS) + list(dict.fromkeys(alphabet))
        self._ids = {c: i for i, c in enumerate(self._chars)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.stop_tokens = [self.eos_id]

    @property
    def vocab_size(self) -> int:
        return len(self._chars)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        unknown = sorted({c for c in text if c not in self._ids})
        if unknown:
            raise ValueError(
                f"CharTokenizer cannot encode characters {unknown!r}; it knows only {_ALPHABET!r}"
            )
        ids = [self._ids[c] for c in text]
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: list[int]) -> str:
        return "".join(self._chars[i] for i in ids if i >= len(_SPECIALS))

    def tokenize_messages(
        self, messages: list[Message], add_eos: bool = True, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Concatenate the contents; mask[i] is True where token i is not trained on.

        The demo format has no role headers, so a generation prompt adds nothing.
        """
        return concat_messages(self.encode, self.bos_id, self.eos_id, messages, add_eos)
