"""SentencePiece tokenizer (Llama 2, Mistral 7B v0.1, TinyLlama-style files), the Llama 2 chat format
and Mistral's instruct format.

Llama 2 chat format, as Meta's `llama/generation.py` (`chat_completion`) writes it:
- an optional system prompt is folded into the first user message as
  `<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}`;
- each (user, assistant) exchange is encoded on its own as
  `<s>` + encode(f"[INST] {user.strip()} [/INST] {assistant.strip()} ") + `</s>`;
- a final user message without an answer is `<s>` + encode(f"[INST] {user.strip()} [/INST]").
Each exchange is one piece of text, so its ids are exactly SentencePiece's for that text (the
leading "▁" included); the Hugging Face Llama 2 chat template renders the same string.

Mistral 7B Instruct (v0.1, v0.2; their Hugging Face chat templates are the same), as Mistral's own
v1 instruct tokenizer (mistral-common) writes it:
- one `<s>` for the whole conversation, then per exchange encode(f"[INST] {user} [/INST]"), then
  encode(assistant) + `</s>`; the next `[INST]` follows `</s>` directly: `<s>[INST] u [/INST] a</s>[INST] ...`;
- no `<<SYS>>` block: a system message is put in front of the first user message as
  f"{system}\n\n{user}"; contents are not stripped.
Each encode adds SentencePiece's word-start "▁", which is what the template's " [INST] " and " "
before the answer become after HF's tokenizer.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from pathlib import Path

import sentencepiece as spm

from ftcore.data.messages import Message, validate_messages
from ftcore.data.tokenizers.base import (
    check_ids,
    check_max_seq_len,
    concat_messages,
    existing_file,
    parse_choice,
    truncate,
)

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


class ChatFormat(enum.Enum):
    LLAMA2 = "llama2"  # <s>[INST] ... [/INST] ... </s> per exchange (Llama 2 chat)
    MISTRAL = "mistral"  # <s>[INST] ... [/INST] ...</s>[INST] ... (Mistral 7B Instruct v0.1 / v0.2)
    NONE = "none"  # message contents one after another, for plain-text and completion data


class SentencePieceTokenizer:
    """Tokenizer over a SentencePiece `.model` file.

    chat_format: "llama2", "mistral" or "none" (see ChatFormat). max_seq_len: cut `tokenize_messages` output.
    pad_id: the file's pad id if it has one; Llama 2 and Mistral have none, so the unknown-token id
    (0) is used: padded positions are never attended to nor trained on, and a pad distinct from
    `</s>` keeps code that finds padding by id from mistaking real end tokens for it.
    """

    def __init__(
        self, path: str | Path, chat_format: str | ChatFormat = "llama2", max_seq_len: int | None = None
    ):
        self.path = existing_file(path, "SentencePiece tokenizer")
        self.chat_format = parse_choice(chat_format, ChatFormat, "chat_format")
        self.max_seq_len = check_max_seq_len(max_seq_len)
        self._model = spm.SentencePieceProcessor()
        try:
            self._model.Load(str(self.path))
        except (OSError, RuntimeError) as error:
            raise ValueError(
                f"{self.path} is not a SentencePiece model ({error}); {_tokenizer_hint(self.path)}"
            ) from error
        self.vocab_size = self._model.vocab_size()
        self.bos_id = self._model.bos_id()
        self.eos_id = self._model.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{self.path} defines no BOS or EOS piece; ftcore needs both to frame sequences")
        self.pad_id = self._model.pad_id() if self._model.pad_id() >= 0 else self._model.unk_id()
        self.stop_tokens = [self.eos_id]

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """Text to ids. SentencePiece adds its "▁" word-start marker at the start of `text`.

        Text such as "<s>" inside `text` is encoded as ordinary characters, never as the control id.
        """
        if not isinstance(text, str):
            raise ValueError(f"SentencePieceTokenizer.encode expects a str, got {type(text).__name__}")
        ids = self._model.encode(text)
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        """Ids to text; control ids (`<s>`, `</s>`, pad) are dropped, as SentencePiece does."""
        return self._model.decode(check_ids(ids, self.vocab_size, type(self).__name__))

    def tokenize_messages(
        self, messages: Sequence[Message], add_eos: bool = True, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """A conversation as (ids, mask); mask True = not trained on.

        add_eos=False leaves the last assistant answer open (no trailing space, no `</s>`), for
        continuing it. add_generation_prompt adds nothing and is accepted so that callers can treat
        every tokenizer alike: in the Llama 2 and Mistral formats a conversation that ends on a user
        message already ends with the "[/INST]" the model answers, and plain text has no prompt.
        """
        validate_messages(messages)
        if self.chat_format is ChatFormat.NONE:
            tokens, mask = concat_messages(self.encode, self.bos_id, self.eos_id, messages, add_eos)
        elif self.chat_format is ChatFormat.MISTRAL:
            tokens, mask = self._tokenize_mistral(messages, add_eos)
        else:
            tokens, mask = self._tokenize_llama2(messages, add_eos)
        return truncate(tokens, mask, self.max_seq_len)

    def _tokenize_llama2(self, messages: Sequence[Message], add_eos: bool) -> tuple[list[int], list[bool]]:
        tokens: list[int] = []
        mask: list[bool] = []
        exchanges = _exchanges(messages, _fold_llama2_system, "Llama 2")
        for index, (user, assistant) in enumerate(exchanges):
            prompt_text = f"{B_INST} {user.content.strip()} {E_INST}"
            prompt = [self.bos_id] + self._model.encode(prompt_text)
            tokens += prompt
            mask += [user.masked] * len(prompt)
            if assistant is None:
                continue
            close = add_eos or index < len(exchanges) - 1
            answer_text = f"{prompt_text} {assistant.content.strip()}" + (" " if close else "")
            exchange = [self.bos_id] + self._model.encode(answer_text) + ([self.eos_id] if close else [])
            if exchange[: len(prompt)] != prompt:
                # SentencePiece keeps "▁answer" apart from "]" when it splits by whitespace (the
                # default, and Llama 2's / Mistral's setting); a model that merges across spaces
                # cannot mark where the answer starts.
                raise ValueError(
                    f"{self.path}: the ids of '{prompt_text}' are not a prefix of those of the whole "
                    "exchange, so the answer's tokens cannot be told apart; use chat_format='none'"
                )
            answer = exchange[len(prompt) :]
            tokens += answer
            mask += [assistant.masked] * len(answer)
        return tokens, mask

    def _tokenize_mistral(self, messages: Sequence[Message], add_eos: bool) -> tuple[list[int], list[bool]]:
        tokens, mask = [self.bos_id], [True]
        exchanges = _exchanges(messages, _fold_mistral_system, "Mistral")
        for index, (user, assistant) in enumerate(exchanges):
            prompt = self._model.encode(f"{B_INST} {user.content} {E_INST}")
            tokens += prompt
            mask += [user.masked] * len(prompt)
            if assistant is None:
                continue
            close = add_eos or index < len(exchanges) - 1
            answer = self._model.encode(assistant.content) + ([self.eos_id] if close else [])
            tokens += answer
            mask += [assistant.masked] * len(answer)
        return tokens, mask


def _fold_llama2_system(system: str, user: str) -> str:
    return B_SYS + system + E_SYS + user


def _fold_mistral_system(system: str, user: str) -> str:
    return f"{system}\n\n{user}"


def _exchanges(
    messages: Sequence[Message], fold_system: Callable[[str, str], str], format_name: str
) -> list[tuple[Message, Message | None]]:
    """Pair messages into (user, assistant-or-None), folding a system prompt into the first user turn.

    The folded user message is masked if either part is (their tokens cannot be separated).
    """
    rest = list(messages)
    if rest[0].role == "system":
        system = rest.pop(0)
        if not rest or rest[0].role != "user":
            raise ValueError(
                f"the {format_name} chat format needs a user message right after the system message"
            )
        first = rest[0]
        rest[0] = Message("user", fold_system(system.content, first.content), system.masked or first.masked)
    exchanges = []
    for index in range(0, len(rest), 2):
        user = rest[index]
        assistant = rest[index + 1] if index + 1 < len(rest) else None
        if user.role != "user" or (assistant is not None and assistant.role != "assistant"):
            raise ValueError(
                f"the {format_name} chat format needs user and assistant messages taking turns "
                f"(after an optional system message); got roles {[m.role for m in messages]}"
            )
        exchanges.append((user, assistant))
    return exchanges


def _tokenizer_hint(path: Path) -> str:
    """What the file probably is instead: a tiktoken file is lines of `base64 rank`."""
    with open(path, "rb") as f:
        first = f.readline(200).split()
    if len(first) == 2 and first[1].isdigit():
        return "it looks like a tiktoken file (Llama 3): use ftcore.data.tokenizers.Llama3Tokenizer"
    return "point the tokenizer at the checkpoint's tokenizer.model (Llama 2, Mistral)"
