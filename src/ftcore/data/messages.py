"""Chat messages: the unit every tokenizer's `tokenize_messages` consumes.

A conversation is a list of `Message`. `masked=True` means "do not train on this message": its
tokens (header included) get mask True and, downstream, label -100.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# "ipython" is Meta's Llama 3.1 role for tool results; "tool" is the common (OpenAI / HF) name for
# the same thing, and the Llama 3 format writes it as "ipython", as Meta's chat format does.
ROLES = ("system", "user", "assistant", "ipython", "tool")
TOOL_ROLES = ("ipython", "tool")


@dataclass
class Message:
    """One chat turn. role: system | user | assistant | ipython | tool; content: the text."""

    role: str
    content: str
    masked: bool = False

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(
                f"Message role {self.role!r} is not supported; use one of {', '.join(ROLES)} "
                "(map dataset roles such as 'human'/'gpt' to 'user'/'assistant' first)"
            )
        if not isinstance(self.content, str):
            raise ValueError(
                f"Message content must be a str, got {type(self.content).__name__} for a "
                f"{self.role!r} message; join multi-part content into one string first"
            )
        if not isinstance(self.masked, bool):
            raise ValueError(f"Message.masked must be a bool, got {self.masked!r}")

    @classmethod
    def from_dict(cls, data: Mapping) -> Message:
        """Build from `{"role": ..., "content": ..., "masked": ...}` ("masked" optional)."""
        missing = [key for key in ("role", "content") if key not in data]
        if missing:
            raise ValueError(
                f"message {dict(data)!r} lacks key(s) {missing}; each needs 'role' and 'content'"
            )
        return cls(role=data["role"], content=data["content"], masked=bool(data.get("masked", False)))


def validate_messages(messages: Sequence[Message]) -> None:
    """Check the ordering rules every chat format shares; raise ValueError naming the bad index.

    Rules: at least one message; a system message only at index 0; an assistant message follows a
    user or tool message (never opens the chat, never follows another assistant message).
    """
    if len(messages) == 0:
        raise ValueError("a conversation needs at least one message; got an empty list")
    previous_role = None
    for index, message in enumerate(messages):
        if not isinstance(message, Message):
            raise ValueError(
                f"messages[{index}] is a {type(message).__name__}, not a Message; "
                "build it with ftcore.data.messages.Message or Message.from_dict"
            )
        if message.role == "system" and index != 0:
            raise ValueError(f"messages[{index}] is a system message; a system message may only come first")
        if message.role == "assistant" and previous_role not in ("user", *TOOL_ROLES):
            after = (
                "at the start" if previous_role in (None, "system") else f"after an {previous_role} message"
            )
            raise ValueError(
                f"messages[{index}] is an assistant message {after}; an assistant message must "
                "answer a user (or tool) message"
            )
        previous_role = message.role
