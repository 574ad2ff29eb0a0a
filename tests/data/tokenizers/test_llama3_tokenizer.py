"""Llama3Tokenizer against independent references.

References, none of them ftcore code:
- ids published by Meta (llama-models' tokenizer tests) and the assets README;
- a Hugging Face `tokenizers` BPE built from the same rank file by transformers' TikTokenConverter
  (its own regex engine and BPE, not tiktoken);
- the Meta-Llama-3-Instruct chat template (Jinja, as in its tokenizer_config.json) rendered with
  jinja2 and tokenized by that HF tokenizer with special tokens recognised.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from ftcore.data.messages import Message
from ftcore.data.tokenizers import Llama3Tokenizer
from ftcore.data.tokenizers.llama3 import MAX_RUN_CHARS, split_for_tiktoken

LLAMA3 = "tokenizers/llama3_tokenizer.model"
SMALL = "tokenizers/tiktoken_small.model"

# Meta llama-models `llama3/tokenizer.py` facts, written out here independently of ftcore's table.
META_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
] + [f"<|reserved_special_token_{k}|>" for k in range(2, 246)]

# The chat template of meta-llama/Meta-Llama-3-8B-Instruct (tokenizer_config.json), bos_token "<|begin_of_text|>".
LLAMA3_INSTRUCT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

TEXTS = [
    "Hello world",
    " Hello world",
    "a  b   c\t\td\n\n\ne   \n  f    ",
    "   leading and trailing   ",
    "12345 1234567 3.14159 2024-01-01 1,000,000",
    "naïve café Ελληνικά русский 日本語のテキスト 한국어 עברית",
    "🦙🔥👍🏽 family: 👨\u200d👩\u200d👧 flags 🇫🇷",
    "I'm sure you don't know; WE'LL see, she's here, they'RE gone, I'd've",
    "def f(x):\n    return x**2  # square\r\n\tpass\n",
    "<|eot_id|> is text here, not a special token",
    "",
]


@functools.cache
def ours(path: Path) -> Llama3Tokenizer:
    return Llama3Tokenizer(path)


@functools.cache
def hf_plain(path: Path):
    """HF BPE over the ranks alone: special-token names in text stay text, as in Meta's encode."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    return TikTokenConverter(vocab_file=str(path)).converted()


@functools.cache
def hf_with_specials(path: Path):
    """The same BPE with Meta's 256 special tokens added in order (ids from 128000 on)."""
    from tokenizers import Tokenizer

    reference = Tokenizer.from_str(hf_plain(path).to_str())
    reference.add_special_tokens(META_SPECIAL_TOKENS)
    return reference


def hf_encode_plain(path: Path, text: str) -> list[int]:
    return hf_plain(path).encode(text, add_special_tokens=False).ids


def test_published_ids(assets):
    tok = ours(assets / LLAMA3)
    assert tok.encode("Hello world", add_bos=False, add_eos=False) == [9906, 1917]
    assert tok.encode(" Hello world", add_bos=False, add_eos=False) == [22691, 1917]
    # Meta llama-models test_tokenizer.py: encode(..., bos=True, eos=True)
    assert tok.encode("This is a test sentence.") == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert tok.decode([128000, 2028, 374, 264, 1296, 11914, 13, 128001]) == (
        "<|begin_of_text|>This is a test sentence.<|end_of_text|>"
    )


def test_special_token_ids(assets):
    tok = ours(assets / LLAMA3)
    assert tok.vocab_size == 128_256
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eot_id, tok.eom_id) == (
        128000,
        128001,
        128004,
        128009,
        128008,
    )
    assert (tok.start_header_id, tok.end_header_id, tok.python_tag_id) == (128006, 128007, 128010)
    assert tok.stop_tokens == [128001, 128008, 128009]
    assert {name: tok.special_tokens[name] for name in META_SPECIAL_TOKENS} == {
        name: 128000 + i for i, name in enumerate(META_SPECIAL_TOKENS)
    }
    # and the HF reference used for the chat format agrees on the ids it gives them
    reference = hf_with_specials(assets / LLAMA3)
    assert [reference.token_to_id(name) for name in META_SPECIAL_TOKENS] == list(range(128000, 128256))


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_hf_bpe(assets, text):
    path = assets / LLAMA3
    tok = ours(path)
    ids = tok.encode(text, add_bos=False, add_eos=False)
    assert ids == hf_encode_plain(path, text)
    assert tok.decode(ids) == text


def test_digits_split_in_groups_of_three(assets):
    tok = ours(assets / LLAMA3)
    pieces = [tok.decode([i]) for i in tok.encode("12345", add_bos=False, add_eos=False)]
    assert pieces == ["123", "45"]


def test_special_text_is_not_a_special_token(assets):
    tok = ours(assets / LLAMA3)
    ids = tok.encode("<|eot_id|><|begin_of_text|>", add_bos=False, add_eos=False)
    assert all(i < 128000 for i in ids)


CONVERSATIONS = [
    [Message("user", "What is 2 + 2?", masked=True), Message("assistant", "4.")],
    [
        Message("system", "  You are terse.\n", masked=True),
        Message("user", "\nName a llama fact 🦙  ", masked=True),
        Message("assistant", " Llamas hum. "),
        Message("user", "I'm curious: don't they spit?", masked=True),
        Message("assistant", "They do, 12345 times.\n\n"),
    ],
    [Message("system", "Be brief.", masked=True), Message("user", "Hi", masked=True)],
]


def render_official(messages: list[Message], add_generation_prompt: bool) -> str:
    import jinja2

    template = jinja2.Environment().from_string(LLAMA3_INSTRUCT_TEMPLATE)
    as_dicts = [{"role": m.role, "content": m.content} for m in messages]
    return template.render(
        messages=as_dicts, bos_token="<|begin_of_text|>", add_generation_prompt=add_generation_prompt
    )


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_format_matches_official_template(assets, conversation, add_generation_prompt):
    path = assets / LLAMA3
    messages = CONVERSATIONS[conversation]
    expected = hf_with_specials(path).encode(render_official(messages, add_generation_prompt)).ids
    tokens, mask = ours(path).tokenize_messages(messages, add_generation_prompt=add_generation_prompt)
    assert tokens == expected
    assert len(mask) == len(tokens)


def test_dialog_matches_meta_published_ids(assets):
    # Meta llama-models test_tokenizer.py `test_encode_dialog` (system + user + assistant header).
    tok = ours(assets / LLAMA3)
    messages = [Message("system", "This is a test sentence."), Message("user", "This is a response.")]
    tokens, _ = tok.tokenize_messages(messages, add_generation_prompt=True)
    assert tokens == [
        128000, 128006, 9125, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009,
        128006, 882, 128007, 271, 2028, 374, 264, 2077, 13, 128009,
        128006, 78191, 128007, 271,
    ]  # fmt: skip


def test_mask_covers_masked_messages_with_their_headers(assets):
    tok = ours(assets / LLAMA3)
    user = Message("user", "Question?", masked=True)
    answer = Message("assistant", "Answer.")
    tokens, mask = tok.tokenize_messages([user, answer], add_generation_prompt=False)
    user_len = len(tok.tokenize_message(user))
    assert mask == [True] + [True] * user_len + [False] * (len(tokens) - 1 - user_len)
    assert tokens[1 + user_len] == tok.start_header_id  # the assistant header is trained on
    assert tokens[-1] == tok.eot_id and mask[-1] is False  # so the model learns to end its turn


def test_add_eos_false_leaves_last_turn_open(assets):
    tok = ours(assets / LLAMA3)
    messages = [Message("user", "Say hi", masked=True), Message("assistant", "Hi")]
    closed, _ = tok.tokenize_messages(messages)
    opened, _ = tok.tokenize_messages(messages, add_eos=False)
    assert closed == opened + [tok.eot_id]


def test_max_seq_len_truncates(assets):
    tok = Llama3Tokenizer(assets / SMALL, max_seq_len=5)
    tokens, mask = tok.tokenize_messages([Message("user", "a long enough message to cut", masked=True)])
    assert len(tokens) == len(mask) == 5
    assert tokens[:2] == [tok.bos_id, tok.start_header_id]


def test_small_file_layout(assets):
    tok = ours(assets / SMALL)
    assert (tok.vocab_size, tok.bos_id, tok.pad_id, tok.eot_id) == (2256, 2000, 2004, 2009)
    text = "Hello world, 12345 don't 🦙"
    assert tok.encode(text, add_bos=False, add_eos=False) == hf_encode_plain(assets / SMALL, text)


def test_split_for_tiktoken_follows_meta_limits():
    text = "x" * (2 * MAX_RUN_CHARS + 10) + " " * 3 + "y" * 5
    pieces = list(split_for_tiktoken(text))
    assert "".join(pieces) == text
    assert [len(p) for p in pieces] == [MAX_RUN_CHARS, MAX_RUN_CHARS, 10 + 3 + 5]


def test_huge_input_round_trips(assets):
    tok = ours(assets / SMALL)
    text = ("word " * 90_000) + "z" * 30_000  # 480k chars: two chunks and one long run
    assert tok.decode(tok.encode(text, add_bos=False, add_eos=False)) == text


def test_bad_inputs_raise_clear_errors(assets, tmp_path):
    with pytest.raises(ValueError, match="SentencePieceTokenizer"):
        Llama3Tokenizer(assets / "tokenizers/m.model")
    with pytest.raises(ValueError, match="not found"):
        Llama3Tokenizer(tmp_path / "missing.model")
    tok = ours(assets / SMALL)
    with pytest.raises(ValueError, match="id 2256 at position 1"):
        tok.decode([5, 2256])
    assert tok.decode([tok.bos_id, 72, tok.eos_id], skip_special_tokens=True) == tok.decode([72])


def test_generation_prompt_closes_the_last_turn_even_without_eos(assets):
    tok = ours(assets / "tokenizers" / "llama3_tokenizer.model")
    messages = [Message("user", "Write a poem")]
    closed, _ = tok.tokenize_messages(messages, add_eos=True, add_generation_prompt=True)
    assert tok.tokenize_messages(messages, add_eos=False, add_generation_prompt=True)[0] == closed
