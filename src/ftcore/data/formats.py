"""Turn one data row (a dict) into messages or text, checking every field on the way.

Formats:
  alpaca      {instruction, input?, output}: user = instruction (+ blank line + input when non-empty),
              assistant = output. No Alpaca prompt template: the tokenizer's own chat format frames
              the turns, as it will at inference with an instruct model.
  sharegpt    {conversations: [{from: human|gpt|system, value}]}  (also accepts user/assistant)
  openai      {messages: [{role: user|assistant|system, content}]}
  text        {text}: plain text for continued pretraining.
  preference  {prompt | conversations | messages, chosen, rejected}: chosen/rejected are a string, one
              message, or a list of messages.

A problem raises `RowError` (a ValueError) saying what is wrong and how to fix it; the caller adds
the file and line.
"""

from __future__ import annotations

from typing import Any

from ftcore.data.messages import Message, validate_messages

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
OPENAI_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}
CHAT_STYLES = ("sharegpt", "openai", "auto")


class RowError(ValueError):
    """One row is unusable; the message names the field and the fix."""


def apply_column_map(row: dict[str, Any], column_map: dict[str, str] | None) -> dict[str, Any]:
    """Rename the file's columns to the names ftcore expects: `column_map` is {expected: in_file}."""
    if not column_map:
        return row
    renamed = dict(row)
    for expected, in_file in column_map.items():
        if in_file not in row:
            raise RowError(
                f"column_map maps {expected!r} to column {in_file!r}, which this row lacks (it has: {_columns(row)})"
            )
        renamed[expected] = renamed.pop(in_file)
    return renamed


def alpaca_to_messages(row: dict[str, Any], train_on_input: bool = False) -> list[Message]:
    instruction = required_text(row, "instruction")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise RowError(f"column 'input' must be a string, got {type(extra).__name__}")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return [
        Message("user", prompt, masked=not train_on_input),
        Message("assistant", required_text(row, "output"), masked=False),
    ]


def chat_to_messages(row: dict[str, Any], style: str = "auto", train_on_input: bool = False) -> list[Message]:
    column = _conversation_column(row, style)
    messages = parse_messages(row[column], column, style)
    if not any(m.role == "assistant" for m in messages):
        raise RowError(
            f"'{column}' has no assistant turn, so nothing would be trained; add one or delete the row"
        )
    _check_order(messages, column)
    return mask_messages(messages, train_on_input)


def text_of(row: dict[str, Any]) -> str:
    return required_text(row, "text")


def preference_to_messages(
    row: dict[str, Any], style: str = "auto", train_on_input: bool = False
) -> tuple[list[Message], list[Message]]:
    """(chosen conversation, rejected conversation), each ending with the assistant answer."""
    prompt = _preference_prompt(row, style)
    chosen = prompt + _answer(row, "chosen", style)
    rejected = prompt + _answer(row, "rejected", style)
    for name, conversation in (("chosen", chosen), ("rejected", rejected)):
        if conversation[-1].role != "assistant":
            raise RowError(
                f"'{name}' must end with an assistant answer, it ends with a {conversation[-1].role} turn"
            )
        _check_order(conversation, name)
    return _train_on_answer(chosen, train_on_input), _train_on_answer(rejected, train_on_input)


def _train_on_answer(messages: list[Message], train_on_input: bool) -> list[Message]:
    """Train on the final answer only, or on every turn with `train_on_input`. Earlier assistant turns are
    prompt: DPO compares the two answers, and shared turns would keep a pair whose answers were cut off
    by max_seq_len looking trainable while its chosen and rejected sequences are the same tokens."""
    last = len(messages) - 1
    return [
        Message(m.role, m.content, masked=index < last and not train_on_input)
        for index, m in enumerate(messages)
    ]


def mask_messages(messages: list[Message], train_on_input: bool) -> list[Message]:
    """Train on assistant turns only, or on every turn with `train_on_input`."""
    return [Message(m.role, m.content, masked=m.role != "assistant" and not train_on_input) for m in messages]


def _check_order(messages: list[Message], column: str) -> None:
    """The turn order every chat template needs (an assistant turn answers a user turn)."""
    try:
        validate_messages(messages)
    except ValueError as e:
        raise RowError(f"'{column}': {e}; fix the order of the turns or delete the row") from None


def parse_messages(turns: Any, column: str, style: str) -> list[Message]:
    if style not in CHAT_STYLES:
        raise ValueError(f"conversation_style {style!r} is not one of {CHAT_STYLES}")
    if not isinstance(turns, list):
        raise RowError(f"'{column}' must be a list of messages, got {type(turns).__name__}")
    if not turns:
        raise RowError(
            f"'{column}' is an empty conversation; give it at least one user and one assistant message, or delete the row"
        )
    messages = [_parse_turn(turn, f"{column}[{i}]", style) for i, turn in enumerate(turns)]
    for i, message in enumerate(messages[1:], start=1):
        if message.role == "system":
            raise RowError(
                f"{column}[{i}] is a system message after the first turn; move it to the start of the conversation"
            )
    return messages


def _parse_turn(turn: Any, name: str, style: str) -> Message:
    if not isinstance(turn, dict):
        raise RowError(
            f'{name} must be an object like {{"from": ..., "value": ...}}, got {type(turn).__name__}'
        )
    if style == "auto":
        style = "sharegpt" if "from" in turn else "openai" if "role" in turn else "unknown"
    if style == "unknown":
        raise RowError(
            f"{name} has neither 'from'/'value' (ShareGPT) nor 'role'/'content' (OpenAI) keys (it has: {_columns(turn)})"
        )
    role_key, text_key, roles = (
        ("from", "value", SHAREGPT_ROLES) if style == "sharegpt" else ("role", "content", OPENAI_ROLES)
    )
    for key in (role_key, text_key):
        if key not in turn:
            raise RowError(f"{name} lacks the key {key!r} of the {style} style (it has: {_columns(turn)})")
    role = turn[role_key]
    if role not in roles:
        raise RowError(f"{name} has role {role!r}; allowed {role_key!r} values are {sorted(roles)}")
    return Message(roles[role], _text(turn[text_key], f"{name}.{text_key}"))


def _conversation_column(row: dict[str, Any], style: str) -> str:
    candidates = {"sharegpt": ["conversations"], "openai": ["messages"]}.get(
        style, ["conversations", "messages"]
    )
    for column in candidates:
        if column in row:
            return column
    wanted = " or ".join(repr(c) for c in candidates)
    raise RowError(
        f"missing column {wanted} (the row has: {_columns(row)}); rename yours with column_map: {{{candidates[0]}: <your column>}}"
    )


def _preference_prompt(row: dict[str, Any], style: str) -> list[Message]:
    if "prompt" in row:
        return [Message("user", required_text(row, "prompt"))]
    for column in ("conversations", "messages"):
        if column in row:
            return parse_messages(row[column], column, style)
    return []  # chosen/rejected then hold whole conversations, prompt included


def _answer(row: dict[str, Any], column: str, style: str) -> list[Message]:
    if column not in row:
        raise RowError(
            f"missing column {column!r} (the row has: {_columns(row)}); rename yours with column_map: {{{column}: <your column>}}"
        )
    value = row[column]
    if isinstance(value, dict):
        return [_parse_turn(value, column, style)]
    if isinstance(value, list):
        return parse_messages(value, column, style)
    return [Message("assistant", required_text(row, column))]


def required_text(row: dict[str, Any], column: str) -> str:
    if column not in row:
        raise RowError(
            f"missing column {column!r} (the row has: {_columns(row)}); rename yours with column_map: {{{column}: <your column>}}"
        )
    return _text(row[column], f"column {column!r}")


def _text(value: Any, name: str) -> str:
    if value is None:
        raise RowError(f"{name} is null; give it text or delete the row")
    if not isinstance(value, str):
        raise RowError(f"{name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RowError(f"{name} is empty; give it text or delete the row")
    return value


def _columns(row: dict[str, Any]) -> str:
    return ", ".join(repr(k) for k in row) or "no columns"
