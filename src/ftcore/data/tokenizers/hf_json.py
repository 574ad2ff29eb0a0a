"""Byte-level BPE tokenizers from a Hugging Face `tokenizer.json` (Qwen2 / Qwen2.5, GPT-2 style), run
by tiktoken, plus the ChatML chat format.

Facts about the file format (Hugging Face `tokenizers`) that this relies on:
- `model` is `{"type": "BPE", "vocab": {token: id}, "merges": [...]}`; merges are "a b" strings
  (older files) or ["a", "b"] pairs (newer files), in priority order;
- byte-level tokens spell each byte with one printable character (GPT-2's byte-to-unicode table:
  bytes 33-126, 161-172 and 174-255 stand for themselves, the other 68 bytes map to 256, 257, ... in
  byte order), so "Ġ" is the space byte;
- the pre-tokenizer is either `ByteLevel(use_regex=true)` (GPT-2's regex) or a `Sequence` of a
  `Split` with a regex (behaviour "Isolated") and a `ByteLevel(use_regex=false)` (Qwen2, Llama 3);
- `added_tokens` hold `<|endoftext|>`, `<|im_start|>`, ...; those with `special: false` (Qwen2.5's
  `<tool_call>`, `<|fim_prefix|>`, ...) are matched in ordinary text, the special ones are not
  (ftcore never reads special tokens out of data);
- the normalizer is none or NFC (Qwen2).

tiktoken merges, at every step, the adjacent pair whose concatenation has the lowest rank; a BPE
model merges the listed pair with the lowest merge index. The two agree when a token's rank grows
with the index of the merge that creates it, which is how byte-level vocabularies are numbered
(256 bytes, then one id per merge, as tiktoken's own GPT-2 loader checks against `encoder.json`).
`load_mergeable_ranks` verifies exactly that, so ids can serve as ranks.
"""

from __future__ import annotations

import enum
import json
import re
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path

import tiktoken

from ftcore.data.messages import TOOL_ROLES, Message, validate_messages
from ftcore.data.tokenizers.base import (
    check_ids,
    check_max_seq_len,
    existing_file,
    parse_choice,
    truncate,
)
from ftcore.data.tokenizers.llama3 import split_for_tiktoken

# GPT-2's pre-tokenizer regex, used by `ByteLevel(use_regex=true)`.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# What Qwen2.5's chat template inserts when a conversation has no system message.
QWEN2_5_DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


class HFChatFormat(enum.Enum):
    CHATML = "chatml"  # <|im_start|>role\ncontent<|im_end|>\n (Qwen2, Qwen2.5)
    NONE = "none"  # message contents one after another, for plain-text and completion data


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from each byte to the printable character that spells it in the vocabulary."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def read_tokenizer_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is not a JSON tokenizer.json ({error}); a SentencePiece .model needs "
            "SentencePieceTokenizer and a Llama 3 original/tokenizer.model needs Llama3Tokenizer"
        ) from error
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise ValueError(f"{path}: `model.type` is {kind!r}; HFTokenizer reads byte-level BPE files only")
    if (
        model.get("byte_fallback")
        or model.get("continuing_subword_prefix")
        or model.get("end_of_word_suffix")
    ):
        raise ValueError(
            f"{path}: a BPE with byte_fallback / subword prefixes is SentencePiece-style, not byte-level; "
            "use SentencePieceTokenizer with the model's tokenizer.model"
        )
    return data


def pre_tokenizer_pattern(spec: dict | None, path: Path) -> str:
    """The regex that splits text into pieces before BPE, from the `pre_tokenizer` section."""
    if spec and spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        _check_no_prefix_space(spec, path)
        return GPT2_PATTERN
    steps = spec.get("pretokenizers", []) if spec and spec.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel":
        split, byte_level = steps
        pattern = split.get("pattern", {}).get("Regex")
        if (
            pattern is not None
            and split.get("behavior") == "Isolated"
            and not split.get("invert", False)
            and not byte_level.get("use_regex", True)
        ):
            _check_no_prefix_space(byte_level, path)
            return pattern
    raise ValueError(
        f"{path}: pre_tokenizer {json.dumps(spec)[:300]} is not one HFTokenizer reads; it reads "
        "ByteLevel(use_regex=true) (GPT-2) or Sequence[Split(Regex, Isolated), ByteLevel(use_regex=false)] (Qwen2)"
    )


def _check_no_prefix_space(byte_level: dict, path: Path) -> None:
    if byte_level.get("add_prefix_space", False):
        raise ValueError(f"{path}: ByteLevel add_prefix_space=true (RoBERTa-style) is not supported")


def normalizer_function(spec: dict | None, path: Path) -> Callable[[str], str] | None:
    if spec is None:
        return None
    if spec.get("type") == "NFC":
        return lambda text: unicodedata.normalize("NFC", text)
    raise ValueError(f"{path}: normalizer {spec.get('type')!r} is not supported (only none or NFC)")


def load_mergeable_ranks(model: dict, added_contents: set[str], path: Path) -> dict[bytes, int]:
    """Token bytes -> id for every vocabulary entry that is not an added token; ids serve as tiktoken
    ranks, which is verified against the merge order (see the module docstring)."""
    byte_of_char = {char: byte for byte, char in bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for token, token_id in model["vocab"].items():
        if token in added_contents:
            continue  # GPT-2 keeps <|endoftext|> in the vocab too; it is a special token here
        try:
            ranks[bytes(byte_of_char[char] for char in token)] = int(token_id)
        except KeyError:
            raise ValueError(
                f"{path}: vocabulary token {token!r} is not byte-level (it has characters outside GPT-2's "
                "byte table); this is not a byte-level BPE file"
            ) from None
    missing = [byte for byte in range(256) if bytes([byte]) not in ranks]
    if missing:
        raise ValueError(f"{path}: the vocabulary lacks {len(missing)} single bytes (e.g. {missing[:5]})")
    _check_ids_follow_merges(model, ranks, path)
    return ranks


def _check_ids_follow_merges(model: dict, ranks: dict[bytes, int], path: Path) -> None:
    made_by_merges: set[str] = set()
    previous_id = -1
    for index, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merged = left + right
        if merged in made_by_merges:
            continue  # a later duplicate never fires: the first merge already made this token
        made_by_merges.add(merged)
        merged_id = model["vocab"].get(merged)
        if merged_id is None or merged_id <= previous_id:
            raise ValueError(
                f"{path}: merge #{index} ({left!r} + {right!r}) makes a token whose id is "
                f"{'missing' if merged_id is None else merged_id}, not above the previous merge's "
                f"{previous_id}; ids must follow the merge order for tiktoken to reproduce this BPE"
            )
        previous_id = merged_id
    multi_byte = sum(1 for token in ranks if len(token) > 1)
    if multi_byte != len(made_by_merges):
        raise ValueError(
            f"{path}: {multi_byte} multi-byte tokens but {len(made_by_merges)} merges make tokens; "
            "every token must be a byte or the result of a merge"
        )


class HFTokenizer:
    """A byte-level BPE `tokenizer.json` (Qwen2.5, GPT-2 style) encoded with tiktoken.

    chat_format: "chatml" (Qwen) or "none" (see HFChatFormat). max_seq_len: cut `tokenize_messages`
    output. default_system_prompt: with "chatml", the system message added when a conversation has
    none, as Qwen2.5's chat template does (None: add nothing, plain ChatML).
    Ids: no BOS (`bos_id` is None; `add_bos` adds nothing), eos `<|im_end|>` with "chatml" and
    `<|endoftext|>` with "none", pad `<|endoftext|>` (Qwen's own pad token).
    """

    def __init__(
        self,
        path: str | Path,
        chat_format: str | HFChatFormat = "chatml",
        max_seq_len: int | None = None,
        default_system_prompt: str | None = QWEN2_5_DEFAULT_SYSTEM_PROMPT,
    ):
        self.path = existing_file(path, "Hugging Face tokenizer.json")
        self.chat_format = parse_choice(chat_format, HFChatFormat, "chat_format")
        self.max_seq_len = check_max_seq_len(max_seq_len)
        self.default_system_prompt = default_system_prompt
        data = read_tokenizer_json(self.path)
        added = data.get("added_tokens") or []
        self.added_tokens = {token["content"]: int(token["id"]) for token in added}
        ranks = load_mergeable_ranks(data["model"], set(self.added_tokens), self.path)
        self._normalize = normalizer_function(data.get("normalizer"), self.path)
        self._model = tiktoken.Encoding(
            name=self.path.name,
            pat_str=pre_tokenizer_pattern(data.get("pre_tokenizer"), self.path),
            mergeable_ranks=ranks,
            special_tokens=self.added_tokens,
        )
        self.vocab_size = _contiguous_size([*ranks.values(), *self.added_tokens.values()], self.path)
        self.special_ids = {int(t["id"]) for t in added if t.get("special", False)}
        self._inline_added = _inline_added_pattern(added, self.path)
        self.bos_id = None
        self.pad_id = self._token_id(ENDOFTEXT)
        if self.chat_format is HFChatFormat.CHATML:
            self.im_start_id, self.im_end_id = self._token_id(IM_START), self._token_id(IM_END)
            self.eos_id = self.im_end_id
            self.stop_tokens = [self.im_end_id, self.pad_id]
        else:
            self.eos_id = self.pad_id
            self.stop_tokens = [self.eos_id]

    def _token_id(self, content: str) -> int:
        if content not in self.added_tokens:
            raise ValueError(
                f"{self.path} has no added token {content!r}, which chat_format={self.chat_format.value!r} "
                "needs; check that this is a Qwen2/Qwen2.5 tokenizer.json (or GPT-2's, with chat_format='none')"
            )
        return self.added_tokens[content]

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """Text to ids. Special-token text ("<|im_end|>") stays text; non-special added tokens
        ("<tool_call>") become their ids, as in Hugging Face. There is no BOS to add."""
        if not isinstance(text, str):
            raise ValueError(f"HFTokenizer.encode expects a str, got {type(text).__name__}")
        ids: list[int] = []
        segments = self._inline_added.split(text) if self._inline_added else [text]
        for index, segment in enumerate(segments):
            if index % 2 == 1:  # re.split puts the captured added tokens at odd positions
                ids.append(self.added_tokens[segment])
            elif segment:
                ids += self._encode_ordinary(segment)
        return ids + ([self.eos_id] if add_eos else [])

    def _encode_ordinary(self, text: str) -> list[int]:
        if self._normalize is not None:
            text = self._normalize(text)
        ids: list[int] = []
        for piece in split_for_tiktoken(text):
            ids += self._model.encode_ordinary(piece)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Ids to text; invalid UTF-8 (a character cut in half) becomes U+FFFD. skip_special_tokens
        drops the special added tokens (not `<tool_call>` and other non-special ones), as HF does."""
        ids = check_ids(ids, self.vocab_size, type(self).__name__)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return self._model.decode(ids)

    def tokenize_messages(
        self, messages: Sequence[Message], add_eos: bool = True, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """A conversation as (ids, mask); mask True = not trained on.

        ChatML: each message is `<|im_start|>{role}\\n{content}<|im_end|>\\n` and all its tokens take
        its `masked` (so a trained answer learns `<|im_end|>`). Tool results are written as Qwen2.5
        does: consecutive tool messages form one user turn of `\\n<tool_response>\\n{content}\\n</tool_response>`
        blocks, masked if any of them is. add_eos=False leaves the last message open (no
        `<|im_end|>\\n`); add_generation_prompt appends the masked `<|im_start|>assistant\\n`.
        """
        validate_messages(messages)
        if self.chat_format is HFChatFormat.NONE:
            tokens, mask = self._tokenize_plain(messages, add_eos)
        else:
            tokens, mask = self._tokenize_chatml(messages, add_eos, add_generation_prompt)
        return truncate(tokens, mask, self.max_seq_len)

    def _tokenize_plain(self, messages: Sequence[Message], add_eos: bool) -> tuple[list[int], list[bool]]:
        tokens: list[int] = []
        mask: list[bool] = []
        for message in messages:
            ids = self.encode(message.content, add_eos=False)
            tokens += ids
            mask += [message.masked] * len(ids)
        if add_eos:
            tokens.append(self.eos_id)
            mask.append(messages[-1].masked)
        return tokens, mask

    def _tokenize_chatml(
        self, messages: Sequence[Message], add_eos: bool, add_generation_prompt: bool
    ) -> tuple[list[int], list[bool]]:
        turns = chatml_turns(messages, self.default_system_prompt)
        tokens: list[int] = []
        mask: list[bool] = []
        for index, (role, body, masked) in enumerate(turns):
            # Special tokens cut the rendered text into pieces that HF tokenizes one by one, so
            # "{role}\n{content}" is one piece (a content that starts with "\n" merges with the "\n").
            ids = [self.im_start_id, *self.encode(f"{role}\n{body}", add_eos=False)]
            if add_eos or add_generation_prompt or index < len(turns) - 1:  # the header follows a closed turn
                ids += [self.im_end_id, *self.encode("\n", add_eos=False)]
            tokens += ids
            mask += [masked] * len(ids)
        if add_generation_prompt:
            prompt = [self.im_start_id, *self.encode("assistant\n", add_eos=False)]
            tokens += prompt
            mask += [True] * len(prompt)
        return tokens, mask


def chatml_turns(
    messages: Sequence[Message], default_system_prompt: str | None
) -> list[tuple[str, str, bool]]:
    """(role, text after "{role}\\n", masked) per ChatML turn, in Qwen2.5's template layout."""
    turns: list[tuple[str, str, bool]] = []
    if default_system_prompt is not None and messages[0].role != "system":
        turns.append(("system", default_system_prompt, True))
    for index, message in enumerate(messages):
        if message.role not in TOOL_ROLES:
            turns.append((message.role, message.content, message.masked))
            continue
        block = f"<tool_response>\n{message.content}\n</tool_response>"
        follows_tool = index > 0 and messages[index - 1].role in TOOL_ROLES
        if follows_tool:
            _, text, masked = turns[-1]
            turns[-1] = ("user", f"{text}\n{block}", masked or message.masked)
        else:
            turns.append(("user", block, message.masked))
    return turns


def _inline_added_pattern(added: list[dict], path: Path) -> re.Pattern | None:
    """A regex capturing the non-special added tokens, which HF matches inside ordinary text."""
    inline = [token for token in added if not token.get("special", False)]
    for token in inline:
        if token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
            raise ValueError(
                f"{path}: added token {token['content']!r} uses lstrip/rstrip/single_word, which HFTokenizer does not support"
            )
    if not inline:
        return None
    # Longest first, so that a token is never matched by a shorter one it starts with.
    contents = sorted((token["content"] for token in inline), key=len, reverse=True)
    return re.compile("(" + "|".join(re.escape(content) for content in contents) + ")")


def _contiguous_size(ids: list[int], path: Path) -> int:
    size = max(ids) + 1
    if len(set(ids)) != len(ids) or len(ids) != size:
        raise ValueError(
            f"{path}: token ids are not the numbers 0..{size - 1} each once "
            f"({len(ids)} tokens, {len(set(ids))} distinct ids); the file is damaged"
        )
    return size
