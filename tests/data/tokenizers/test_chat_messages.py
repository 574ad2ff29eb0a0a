"""Message validation and the tokenizer/model vocabulary check."""

from __future__ import annotations

import pytest

from ftcore.data.messages import Message, validate_messages
from ftcore.data.tokenizers import Llama3Tokenizer, SentencePieceTokenizer, Tokenizer, check_vocab_matches


def test_message_rejects_unknown_role_and_bad_content():
    with pytest.raises(ValueError, match="role 'human' is not supported"):
        Message("human", "hi")
    with pytest.raises(ValueError, match="content must be a str, got list"):
        Message("user", ["hi"])
    with pytest.raises(ValueError, match="lacks key"):
        Message.from_dict({"role": "user"})
    assert Message.from_dict({"role": "assistant", "content": "x"}) == Message("assistant", "x", masked=False)


@pytest.mark.parametrize(
    "roles, error",
    [
        ([], "at least one message"),
        (["user", "system"], r"messages\[1\] is a system message"),
        (["assistant"], r"messages\[0\] is an assistant message at the start"),
        (["system", "assistant"], r"messages\[1\] is an assistant message at the start"),
        (["user", "assistant", "assistant"], r"messages\[2\] is an assistant message after an assistant"),
    ],
)
def test_validate_messages_names_the_bad_index(roles, error):
    with pytest.raises(ValueError, match=error):
        validate_messages([Message(role, "text") for role in roles])


def test_validate_messages_accepts_tool_turns():
    roles = ["system", "user", "assistant", "ipython", "assistant", "user"]
    validate_messages([Message(role, "text") for role in roles])


def test_llama3_writes_tool_role_as_ipython(assets):
    tok = Llama3Tokenizer(assets / "tokenizers/tiktoken_small.model")
    assert tok.tokenize_header("tool") == tok.tokenize_header("ipython")


def test_tokenizers_follow_the_protocol(assets):
    assert isinstance(Llama3Tokenizer(assets / "tokenizers/tiktoken_small.model"), Tokenizer)
    assert isinstance(SentencePieceTokenizer(assets / "tokenizers/m.model"), Tokenizer)


def test_check_vocab_matches(assets):
    small = Llama3Tokenizer(assets / "tokenizers/tiktoken_small.model")  # 2,000 ranks + 256 special
    check_vocab_matches(small, 2256)
    check_vocab_matches(small, 2304)  # an embedding padded to a multiple of 128 is fine
    with pytest.raises(ValueError, match="ids up to 2255 but the model's embedding has only 2000 rows"):
        check_vocab_matches(small, 2000)
    sp = SentencePieceTokenizer(assets / "tokenizers/m.model")
    with pytest.raises(ValueError, match="another model family"):
        check_vocab_matches(sp, 128_256)
