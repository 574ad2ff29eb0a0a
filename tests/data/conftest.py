"""Fixtures for the data tests: a byte-level toy tokenizer (no assets needed) and the real Llama 3 one."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftcore.data.messages import Message


class ByteTokenizer:
    """Bytes + 4 as ids; one id per role header; bos 1, eos 2, end-of-turn 3, pad 0.

    Small enough to reason about by hand, and it honours the tokenizer contract: mask True = not trained.
    """

    pad_id, bos_id, eos_id, eot_id = 0, 1, 2, 3
    headers = {"system": 260, "user": 261, "assistant": 262}
    vocab_size = 263
    stop_tokens = [2, 3]

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        ids = [b + 4 for b in text.encode("utf-8")]
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 4 for i in ids if 4 <= i < 260).decode("utf-8", errors="replace")

    def tokenize_messages(
        self, messages: list[Message], add_eos: bool = True
    ) -> tuple[list[int], list[bool]]:
        tokens, mask = [self.bos_id], [True]
        for message in messages:
            ids = [self.headers[message.role], *self.encode(message.content, False, False), self.eot_id]
            tokens += ids
            mask += [message.masked] * len(ids)
        return tokens, mask


@pytest.fixture
def byte_tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture(scope="module")
def llama3_tokenizer():
    path = (
        Path(__file__).resolve().parents[2].parent
        / "shared"
        / "assets"
        / "tokenizers"
        / "llama3_tokenizer.model"
    )
    if not path.is_file():
        pytest.skip(f"Llama 3 tokenizer not found at {path} (a fresh clone has no ../shared)")
    from ftcore.data.tokenizers import Llama3Tokenizer

    return Llama3Tokenizer(path)


@pytest.fixture
def data_dir(assets: Path) -> Path:
    return assets / "data"
