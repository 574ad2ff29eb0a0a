"""Llama 3 / 3.1 / 3.2 / 3.3 tokenizer: tiktoken BPE over Meta's rank file, plus the chat format.

Facts from Meta's llama-models (`llama3/tokenizer.py`, `chat_format.py`), the package that ships the
very `tokenizer.model` this reads:
- the file holds 128,000 lines `base64(token bytes) rank`; 256 special tokens follow the ranks;
- the pre-tokenizer regex below (cl100k's, digits in groups of at most three);
- `encode` treats special-token text inside the input as plain text (so a user's "<|eot_id|>"
  cannot end a turn), and tiktoken must not see more than 400,000 characters at once nor runs of
  more than 25,000 whitespace / non-whitespace characters (tiktoken issue #195), so input is cut
  as Meta cuts it;
- a message is `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`, a dialog
  starts with `<|begin_of_text|>`, the "tool" role is written "ipython".
Content is stripped of surrounding whitespace, as the Hugging Face chat template of Meta-Llama-3
(`message['content'] | trim`) and torchtune do; Meta's encoder leaves it as given.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import tiktoken

from ftcore.data.messages import Message, validate_messages
from ftcore.data.tokenizers.base import check_ids, check_max_seq_len, existing_file, truncate

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL_TOKENS = 256
# The named special tokens in id order from the first id after the ranks (128000 for Llama 3);
# the rest of the 256 are `<|reserved_special_token_{k}|>`, k counting on from 2.
NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message: the model expects a tool result next
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
)
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
_RUNS = re.compile(r"\s+|\S+")


def special_token_names() -> list[str]:
    """All 256 special token names, in id order."""
    reserved = NUM_SPECIAL_TOKENS - len(NAMED_SPECIAL_TOKENS)
    return list(NAMED_SPECIAL_TOKENS) + [f"<|reserved_special_token_{2 + k}|>" for k in range(reserved)]


def load_ranks(path: Path) -> dict[bytes, int]:
    """Read a tiktoken rank file; a ValueError naming the line if it is not one."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (IndexError, ValueError) as error:
                raise ValueError(
                    f"{path}:{line_number} is not a tiktoken rank line ('<base64 token> <rank>'): "
                    f"{error}. A SentencePiece .model file needs SentencePieceTokenizer instead"
                ) from error
            ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(
            f"{path}: ranks are not the numbers 0..{len(ranks) - 1} each once; the file is damaged"
        )
    return ranks


def split_for_tiktoken(text: str) -> Iterator[str]:
    """Cut text as Meta does before tiktoken sees it: 400k-character chunks, then inside each chunk
    a cut every 25,000 characters of an unbroken whitespace or non-whitespace run."""
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        chunk = text[start : start + MAX_ENCODE_CHARS]
        if len(chunk) <= MAX_RUN_CHARS:
            yield chunk
            continue
        piece_start = 0
        for run in _RUNS.finditer(chunk):
            for cut in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
                yield chunk[piece_start:cut]
                piece_start = cut
        yield chunk[piece_start:]


class Llama3Tokenizer:
    """Tokenizer of Llama 3.x. `path`: Meta's `tokenizer.model` (original/ in the HF repo).

    max_seq_len: cut `tokenize_messages` output to this length (None: no cut).
    """

    def __init__(self, path: str | Path, max_seq_len: int | None = None):
        self.path = existing_file(path, "Llama 3 tiktoken tokenizer")
        self.max_seq_len = check_max_seq_len(max_seq_len)
        ranks = load_ranks(self.path)
        self.num_base_tokens = len(ranks)
        self.special_tokens = {
            name: self.num_base_tokens + offset for offset, name in enumerate(special_token_names())
        }
        self._model = tiktoken.Encoding(
            name=self.path.name,
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.vocab_size = self.num_base_tokens + NUM_SPECIAL_TOKENS
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        # Llama 3 has no pad token; Meta reserves this one for right-padding fine-tuning batches.
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.start_header_id = self.special_tokens["<|start_header_id|>"]
        self.end_header_id = self.special_tokens["<|end_header_id|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.eom_id = self.special_tokens["<|eom_id|>"]
        self.python_tag_id = self.special_tokens["<|python_tag|>"]
        self.stop_tokens = [self.eos_id, self.eom_id, self.eot_id]
        self._headers: dict[str, list[int]] = {}

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """Text to ids; special-token text inside `text` is encoded as ordinary text."""
        if not isinstance(text, str):
            raise ValueError(f"Llama3Tokenizer.encode expects a str, got {type(text).__name__}")
        ids = [self.bos_id] if add_bos else []
        for piece in split_for_tiktoken(text):
            ids.extend(self._model.encode(piece, allowed_special=set(), disallowed_special=()))
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Ids to text; special tokens appear as their names unless skipped.

        Byte sequences that are not valid UTF-8 (a multi-byte character cut in half) become U+FFFD.
        """
        ids = check_ids(ids, self.vocab_size, type(self).__name__)
        if skip_special_tokens:
            ids = [i for i in ids if i < self.num_base_tokens]
        return self._model.decode(ids)

    def tokenize_header(self, role: str) -> list[int]:
        """`<|start_header_id|>{role}<|end_header_id|>\\n\\n` as ids ("tool" is written "ipython")."""
        if role not in self._headers:  # a handful of roles, each encoded once
            role_text = "ipython" if role == "tool" else role
            self._headers[role] = [
                self.start_header_id,
                *self.encode(role_text, add_bos=False, add_eos=False),
                self.end_header_id,
                *self.encode("\n\n", add_bos=False, add_eos=False),
            ]
        return list(self._headers[role])

    def tokenize_message(self, message: Message, add_end_of_turn: bool = True) -> list[int]:
        """One message: header, stripped content, and `<|eot_id|>` unless the turn is left open."""
        ids = self.tokenize_header(message.role)
        ids += self.encode(message.content.strip(), add_bos=False, add_eos=False)
        if add_end_of_turn:
            ids.append(self.eot_id)
        return ids

    def tokenize_messages(
        self, messages: Sequence[Message], add_eos: bool = True, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """A conversation as (ids, mask); mask True = not trained on.

        `<|begin_of_text|>` is masked; each message's tokens (its header and `<|eot_id|>` included)
        take the message's `masked`. add_eos=False leaves the last message open (no `<|eot_id|>`),
        for continuing a partial answer. add_generation_prompt appends the (masked) assistant header
        the model completes at inference, like the official template's `add_generation_prompt`.
        """
        validate_messages(messages)
        tokens, mask = [self.bos_id], [True]
        for index, message in enumerate(messages):
            is_last = index == len(messages) - 1
            # the assistant header follows a closed turn, whatever add_eos says
            closed = add_eos or add_generation_prompt or not is_last
            ids = self.tokenize_message(message, add_end_of_turn=closed)
            tokens += ids
            mask += [message.masked] * len(ids)
        if add_generation_prompt:
            header = self.tokenize_header("assistant")
            tokens += header
            mask += [True] * len(header)
        return truncate(tokens, mask, self.max_seq_len)
