"""The SentencePiece-style BPE vocabulary embedded in a GGUF file (`tokenizer.ggml.model = llama`).

Encoding follows SentencePiece BPE with merge scores (as llama2.c and llama.cpp do it): a dummy
prefix space is added, spaces become `▁`, each character maps to its piece (or to `<0xNN>` byte
pieces when it has none), then the adjacent pair whose concatenation is a piece with the highest
score is merged, leftmost first, until no merge applies.
"""

from __future__ import annotations

import heapq
from pathlib import Path
from types import SimpleNamespace

from ftcore.data.tokenizers.base import concat_messages
from ftcore.paths import shown_path

SPACE = "\u2581"  # "▁", SentencePiece's visible space
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_BYTE = 6
NO_TOKEN = 2**32 - 1  # GGUF's "unset" id


class GGUFTokenizer:
    """encode/decode plus the ftcore tokenizer protocol (docs/architecture.md)."""

    def __init__(
        self,
        pieces: list[str],
        scores: list[float],
        token_types: list[int],
        bos_id: int,
        eos_id: int,
        pad_id: int,
    ):
        self.pieces = pieces
        self.scores = scores
        self.token_types = token_types
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        # only ordinary pieces take part in encoding; <unk>, <s>, </s> and byte pieces never match text
        not_text = (TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_BYTE)
        self.piece_to_id = {piece: i for i, piece in enumerate(pieces) if token_types[i] not in not_text}
        self.byte_to_id = {}
        for i, piece in enumerate(pieces):
            if token_types[i] == TOKEN_TYPE_BYTE:
                self.byte_to_id[int(piece[3:5], 16)] = i  # piece is "<0xNN>"

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    @property
    def stop_tokens(self) -> list[int]:
        return [self.eos_id]

    def _initial_ids(self, text: str) -> list[int]:
        ids = []
        for char in text:
            if char in self.piece_to_id:
                ids.append(self.piece_to_id[char])
                continue
            for byte in char.encode("utf-8"):
                if byte not in self.byte_to_id:
                    raise ValueError(
                        f"character {char!r} has no piece and the vocabulary has no byte fallback"
                    )
                ids.append(self.byte_to_id[byte])
        return ids

    def _merge_pieces(self, ids: list[int]) -> list[int]:
        """Merge the best-scoring adjacent pair, leftmost first, until none merges. A heap of candidate
        pairs over a linked list of symbols: O(n log n), where rescanning every pair per merge took seconds
        on a 1,500-character answer. A popped pair whose symbols have changed since is stale and skipped."""
        count = len(ids)
        text = [self.pieces[i] for i in ids]
        following = list(range(1, count)) + [-1]
        preceding = list(range(-1, count - 1))
        alive = [True] * count
        candidates: list[tuple[float, int, str, str, int]] = []

        def consider(left: int) -> None:
            right = following[left]
            if right == -1:
                return
            merged = self.piece_to_id.get(text[left] + text[right])
            if merged is not None:  # highest score first; among equals the leftmost (smallest index)
                heapq.heappush(candidates, (-self.scores[merged], left, text[left], text[right], merged))

        for index in range(count - 1):
            consider(index)
        while candidates:
            _, left, left_text, right_text, merged = heapq.heappop(candidates)
            right = following[left]
            if not alive[left] or right == -1 or text[left] != left_text or text[right] != right_text:
                continue
            text[left], ids[left], alive[right] = left_text + right_text, merged, False
            following[left] = following[right]
            if following[right] != -1:
                preceding[following[right]] = left
            if preceding[left] != -1:
                consider(preceding[left])
            consider(left)
        return [token for token, kept in zip(ids, alive) if kept]

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        ids = []
        if text:
            normalized = (" " + text).replace(" ", SPACE)  # SentencePiece's dummy prefix space
            ids = self._merge_pieces(self._initial_ids(normalized))
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: list[int]) -> str:
        out = bytearray()
        for token in ids:
            kind = self.token_types[token]
            if kind == TOKEN_TYPE_CONTROL:
                continue
            if kind == TOKEN_TYPE_BYTE:
                out.append(int(self.pieces[token][3:5], 16))
            else:
                out += self.pieces[token].replace(SPACE, " ").encode("utf-8")
        if out.startswith(b" "):
            del out[0]  # the dummy prefix space added by encode
        return out.decode("utf-8", errors="replace")

    def tokenize_messages(
        self, messages, add_eos: bool = True, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """BOS + each message's content encoded in turn (no chat template: this vocabulary has none, so
        `add_generation_prompt` has no assistant header to append and changes nothing).
        mask[i] True = token i is not trained on (the message's `masked`; BOS is masked)."""
        # Messages may also be plain dicts (a generate config's `messages`), with `masked` optional.
        plain = [
            SimpleNamespace(
                content=_message_field(m, "content"), masked=bool(_message_field(m, "masked", False))
            )
            for m in messages
        ]
        return concat_messages(self.encode, self.bos_id, self.eos_id, plain, add_eos)


def _message_field(message, name: str, default=None):
    if isinstance(message, dict):
        return message.get(name, default)
    return getattr(message, name, default)


def open_gguf(path: str | Path, setting: str):
    """A `gguf.GGUFReader` on `path`, or one line naming the file and `setting` (the key that points at it)."""
    import gguf  # imported lazily: only GGUF users need the package

    if not Path(path).is_file():
        raise ValueError(f"GGUF file {shown_path(path)} not found; set {setting} to an existing .gguf file")
    try:
        return gguf.GGUFReader(str(path))
    except ValueError as error:  # the reader's own words: "GGUF magic invalid", a reshape of a cut-off tensor
        raise ValueError(
            f"{shown_path(path)} is not a readable GGUF file ({error}): it may be another format or cut off "
            f"by an incomplete download; set {setting} to a whole .gguf file"
        ) from None


def gguf_tokenizer(path: str) -> GGUFTokenizer:
    """Read the tokenizer embedded in a GGUF file."""
    reader = open_gguf(path, "the tokenizer path")

    def field(key, default=None):
        value = reader.fields.get(key)
        return default if value is None else value.contents()

    model = field("tokenizer.ggml.model")
    if model != "llama":
        raise ValueError(
            f"{path}: tokenizer.ggml.model is {model!r}; only the SentencePiece-style 'llama' vocabulary is supported"
        )
    pad_id = field("tokenizer.ggml.padding_token_id", NO_TOKEN)
    return GGUFTokenizer(
        pieces=list(field("tokenizer.ggml.tokens")),
        scores=[float(s) for s in field("tokenizer.ggml.scores")],
        token_types=[int(t) for t in field("tokenizer.ggml.token_type")],
        bos_id=int(field("tokenizer.ggml.bos_token_id", 1)),
        eos_id=int(field("tokenizer.ggml.eos_token_id", 2)),
        # no padding token in the file: use the unknown token (0), as Llama 2 fine-tunes do
        pad_id=0 if pad_id == NO_TOKEN else int(pad_id),
    )
