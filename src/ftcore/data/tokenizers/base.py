"""What every ftcore tokenizer offers (docs/architecture.md), and the checks shared by all of them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import Protocol, runtime_checkable

from ftcore.data.messages import Message
from ftcore.paths import shown_path


class MessageLike(Protocol):
    """What `concat_messages` reads of a message: a Message, or a plain stand-in with these fields."""

    @property
    def content(self) -> str: ...

    @property
    def masked(self) -> bool: ...


@runtime_checkable
class Tokenizer(Protocol):
    """The tokenizer contract. In `tokenize_messages`' mask, True = the token is NOT trained on."""

    bos_id: int | None  # None when the model has no BOS token (Qwen); encode's add_bos then adds nothing
    eos_id: int
    pad_id: int
    vocab_size: int
    stop_tokens: list[int]

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def tokenize_messages(
        self, messages: Sequence[Message], add_eos: bool = True, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]: ...


def check_vocab_matches(tokenizer: Tokenizer, model_vocab_size: int, max_unused_rows: int = 1024) -> None:
    """Fail at setup, not mid-training, when a tokenizer and a model's embedding do not belong together.

    Every id the tokenizer can emit must index a row of the embedding (else an index error on the
    first batch that holds it). Models may pad the embedding beyond the tokenizer (Qwen2.5 rounds
    151,665 ids up to 151,936 rows), so up to `max_unused_rows` extra rows are accepted; a larger gap
    means the wrong tokenizer (a Llama 2 tokenizer of 32,000 ids with a Llama 3 model of 128,256
    rows would silently train on the wrong embeddings).
    """
    tokenizer_size = int(tokenizer.vocab_size)
    name = type(tokenizer).__name__
    if tokenizer_size > model_vocab_size:
        raise ValueError(
            f"{name} emits ids up to {tokenizer_size - 1} but the model's embedding has only "
            f"{model_vocab_size} rows; use the tokenizer that was trained with this model "
            "(or a model builder whose vocab_size matches the tokenizer)"
        )
    unused = model_vocab_size - tokenizer_size
    if unused > max_unused_rows:
        raise ValueError(
            f"{name} has {tokenizer_size} ids but the model's embedding has {model_vocab_size} rows "
            f"({unused} never used, more than max_unused_rows={max_unused_rows}); this tokenizer "
            "most likely belongs to another model family"
        )


def truncate(tokens: list[int], mask: list[bool], max_seq_len: int | None) -> tuple[list[int], list[bool]]:
    """Cut tokens and mask to `max_seq_len` (no-op when None).

    A plain cut: no end token is forced into the last slot, so a truncated answer does not teach the
    model to stop mid-sentence.
    """
    if max_seq_len is None:
        return tokens, mask
    return tokens[:max_seq_len], mask[:max_seq_len]


def check_max_seq_len(max_seq_len: int | None) -> int | None:
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 1):
        raise ValueError(f"max_seq_len must be a positive int or None, got {max_seq_len!r}")
    return max_seq_len


def existing_file(path: str | Path, what: str) -> Path:
    """The path as a Path, or a ValueError saying which file is missing and what it should be."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(
            f"{what} file not found: {shown_path(path)} (check the tokenizer `path` in your config)"
        )
    return path


def check_ids(ids: Sequence[int], vocab_size: int, name: str) -> list[int]:
    """Ids as a list of ints; a ValueError naming the first id outside [0, vocab_size)."""
    ids = [int(i) for i in ids]
    bad = next(((pos, i) for pos, i in enumerate(ids) if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise ValueError(
            f"{name}.decode: id {bad[1]} at position {bad[0]} is outside the vocabulary "
            f"[0, {vocab_size}); were these ids made by another tokenizer?"
        )
    return ids


def concat_messages(
    encode: Callable[..., list[int]], bos_id: int, eos_id: int, messages: Sequence[MessageLike], add_eos: bool
) -> tuple[list[int], list[bool]]:
    """Chat without a template: BOS, then each message's content encoded on its own (so each starts a
    new word), then EOS. mask[i] True = not trained: BOS, and every token of a `masked` message; the
    EOS follows the last message."""
    tokens, mask = [bos_id], [True]
    for message in messages:
        ids = encode(message.content, add_bos=False, add_eos=False)
        tokens += ids
        mask += [message.masked] * len(ids)
    if add_eos:
        tokens.append(eos_id)
        mask.append(messages[-1].masked if messages else True)
    return tokens, mask


def parse_choice(value, choices: type[Enum], what: str):
    """`value` as a member of the enum `choices` (a member passes through), or a ValueError that names
    `what` and lists the choices."""
    if isinstance(value, choices):
        return value
    try:
        return choices(value)
    except ValueError:
        listed = ", ".join(repr(c.value) for c in choices)
        raise ValueError(f"{what} {value!r} is not known; use one of {listed}") from None
