"""HFTokenizer against Hugging Face `tokenizers` (the library that writes and reads tokenizer.json).

No Qwen tokenizer.json is available offline, so each test file is made here: a small byte-level BPE
trained by `tokenizers` on the text below, with Qwen2's real normalizer (NFC), pre-tokenizer regex and
added tokens (ids, order and special flags of Qwen2.5's tokenizer_config.json), and a GPT-2-style one
(ByteLevel regex, `<|endoftext|>` inside the vocabulary). References, none of them ftcore code:
- `tokenizers.Tokenizer.from_file` on the same file (its own regex engine and BPE);
- the Qwen2.5-Instruct chat template (Jinja, its facts written out below) rendered with jinja2 and
  tokenized by that reference with special tokens recognised.
"""

from __future__ import annotations

import json
import random

import pytest

from ftcore.data.messages import Message
from ftcore.data.tokenizers import HFTokenizer, check_vocab_matches
from ftcore.data.tokenizers.hf_json import bytes_to_unicode

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2.5's added tokens in id order (151643 on): special ones, then those matched in plain text.
QWEN_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
QWEN_INLINE = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip

# The non-tool part of Qwen2.5-Instruct's chat template (tokenizer_config.json of Qwen/Qwen2.5-*-Instruct).
QWEN2_5_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog. It's 2024, and we're training tokenizers again;
they'll merge frequent pairs of bytes into longer tokens, then those into words.
def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

print([fibonacci(i) for i in range(10)])  # 0 1 1 2 3 5 8 13 21 34
Numbers: 3.14159, 2.71828, 1,000,000 and 42. Prices: $19.99, €5, ¥100.
naïve café résumé Zürich Ελληνικά κείμενο русский текст 日本語のテキスト 中文文本 한국어 텍스트 עברית
Emoji: 🦙🔥👍🏽 family 👨‍👩‍👧 flags 🇫🇷🇯🇵 — dashes – and “quotes” ‘here’…
    indented   with   spaces\tand\ttabs\r\nwindows lines\n\n\nblank lines
I'm sure you don't know; WE'LL see, she's here, they'RE gone, I'd've, y'all.
"""

TEXTS = [
    "Hello world",
    " Hello world",
    "a  b   c\t\td\n\n\ne   \n  f    ",
    "   leading and trailing   ",
    "12345 1234567 3.14159 2024-01-01 1,000,000",
    "naïve café Ελληνικά русский 日本語のテキスト 한국어 עברית",
    "🦙🔥👍🏽 family: 👨\u200d👩\u200d👧 flags 🇫🇷 and unseen 🐍🧪",
    "I'm sure you don't know; WE'LL see, she's here, they'RE gone, I'd've",
    "def f(x):\n    return x**2  # square\r\n\tpass\n",
    "e\u0301 decomposed vs \u00e9 composed: NFC makes them one",
    "<|im_end|> and <|endoftext|> are text here, not special tokens",
    '<tool_call>\n{"name": "f"}\n</tool_call> and <|fim_prefix|>x<|fim_suffix|>',
    "xyzzy qwv unseen wörds ÆØÅ ŋ ∑∫√ \u0000 \x7f",
    "",
]


def train_tokenizer_json(path, pre_tokenizer, normalizer, special_in_vocab: bool) -> None:
    """Train a small byte-level BPE with Hugging Face `tokenizers` and save it as tokenizer.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, trainers
    from tokenizers import pre_tokenizers as pre

    tokenizer = Tokenizer(models.BPE())
    if normalizer:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1200,
        initial_alphabet=pre.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"] if special_in_vocab else [],
        show_progress=False,
    )
    tokenizer.train_from_iterator([CORPUS] * 3, trainer)
    if not special_in_vocab:  # Qwen: added tokens numbered after the vocabulary, in Qwen's order
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL])
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_INLINE])
    tokenizer.save(str(path))


@pytest.fixture(scope="module")
def qwen_like(tmp_path_factory):
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pre

    path = tmp_path_factory.mktemp("qwen_like") / "tokenizer.json"
    split = pre.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False)
    byte_level = pre.ByteLevel(add_prefix_space=False, use_regex=False)
    train_tokenizer_json(path, pre.Sequence([split, byte_level]), normalizer=True, special_in_vocab=False)
    return path


@pytest.fixture(scope="module")
def gpt2_like(tmp_path_factory):
    from tokenizers import pre_tokenizers as pre

    path = tmp_path_factory.mktemp("gpt2_like") / "tokenizer.json"
    train_tokenizer_json(path, pre.ByteLevel(add_prefix_space=False), normalizer=False, special_in_vocab=True)
    return path


def hf_reference(path, special_tokens_as_text: bool):
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(path))
    reference.encode_special_tokens = special_tokens_as_text
    return reference


def random_texts(count: int, seed: int = 0) -> list[str]:
    """Texts mixing words of the corpus with characters it never saw, spaces, newlines and digits."""
    rng = random.Random(seed)
    words = CORPUS.split(" ")
    extras = [" ", "  ", "\n", "\t", "\r\n", "'s", "'LL", "0", "99", "🦙", "ß", "\u0301", "ﬁ", "…", "<", "|>"]
    return ["".join(rng.choice(words + extras) for _ in range(rng.randint(1, 12))) for _ in range(count)]


@pytest.mark.parametrize("text", TEXTS)
def test_qwen_like_encode_matches_hf(qwen_like, text):
    ours = HFTokenizer(qwen_like)
    ids = ours.encode(text, add_bos=True, add_eos=False)  # Qwen has no BOS: add_bos adds nothing
    assert ids == hf_reference(qwen_like, True).encode(text, add_special_tokens=False).ids
    assert ours.decode(ids) == hf_reference(qwen_like, True).decode(ids, skip_special_tokens=False)


def test_qwen_like_random_texts_match_hf(qwen_like):
    ours, reference = HFTokenizer(qwen_like), hf_reference(qwen_like, True)
    for text in random_texts(300):
        assert ours.encode(text, add_eos=False) == reference.encode(text, add_special_tokens=False).ids, text


@pytest.mark.parametrize("text", TEXTS[:10])
def test_gpt2_like_encode_matches_hf(gpt2_like, text):
    ours = HFTokenizer(gpt2_like, chat_format="none")
    ids = ours.encode(text, add_eos=False)
    assert ids == hf_reference(gpt2_like, True).encode(text, add_special_tokens=False).ids
    assert ours.decode(ids) == text


def test_gpt2_like_random_texts_and_ids(gpt2_like):
    ours, reference = HFTokenizer(gpt2_like, chat_format="none"), hf_reference(gpt2_like, True)
    for text in random_texts(300, seed=1):
        assert ours.encode(text, add_eos=False) == reference.encode(text, add_special_tokens=False).ids, text
    endoftext = reference.token_to_id("<|endoftext|>")
    assert (ours.eos_id, ours.pad_id, ours.stop_tokens, ours.bos_id) == (
        endoftext,
        endoftext,
        [endoftext],
        None,
    )
    assert ours.vocab_size == reference.get_vocab_size()


def test_qwen_ids_and_vocab(qwen_like):
    tok, reference = HFTokenizer(qwen_like), hf_reference(qwen_like, False)
    endoftext, im_start, im_end = (reference.token_to_id(t) for t in QWEN_SPECIAL[:3])
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, im_end, endoftext)
    assert tok.stop_tokens == [im_end, endoftext]
    assert tok.vocab_size == reference.get_vocab_size() == im_start + len(QWEN_SPECIAL) + len(QWEN_INLINE) - 1
    assert HFTokenizer(qwen_like, chat_format="none").eos_id == endoftext
    assert tok.encode("hi", add_eos=True)[-1] == im_end
    # Qwen2.5's embedding is padded past its 151,665 ids (151,936 or 152,064 rows): accepted.
    check_vocab_matches(tok, tok.vocab_size + (152064 - 151665))
    with pytest.raises(ValueError, match="embedding has only"):
        check_vocab_matches(tok, tok.vocab_size - 1)


def test_decode_skips_only_special_tokens(qwen_like):
    tok = HFTokenizer(qwen_like)
    ids = [tok.im_start_id, *tok.encode("user\n<tool_call>x", add_eos=False), tok.im_end_id]
    assert tok.decode(ids) == "<|im_start|>user\n<tool_call>x<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\n<tool_call>x"
    assert hf_reference(qwen_like, False).decode(ids, skip_special_tokens=True) == "user\n<tool_call>x"


CONVERSATIONS = [
    [Message("user", "What is 2 + 2?", masked=True), Message("assistant", "4.")],
    [
        Message("system", "You are terse.", masked=True),
        Message("user", "\nName a llama fact 🦙", masked=True),
        Message("assistant", "  Llamas hum.\n\n"),
        Message("user", "I'm curious: don't they spit?", masked=True),
        Message("assistant", "\n\nThey do. <tool_call>"),
    ],
    [
        Message("user", "Weather in Zürich?", masked=True),
        Message(
            "assistant", '<tool_call>\n{"name": "weather", "arguments": {"city": "Zürich"}}\n</tool_call>'
        ),
        Message("tool", '{"temp": 21}', masked=True),
        Message("tool", '{"rain": false}', masked=True),
        Message("assistant", "21 °C and dry."),
    ],
    [Message("system", "Be brief.", masked=True), Message("user", "Hi", masked=True)],
]


def qwen_template_ids(path, messages, add_generation_prompt=False) -> list[int]:
    import jinja2

    text = (
        jinja2.Environment()
        .from_string(QWEN2_5_TEMPLATE)
        .render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=add_generation_prompt,
        )
    )
    return hf_reference(path, False).encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_chatml_matches_qwen2_5_template(qwen_like, conversation):
    messages = CONVERSATIONS[conversation]
    tokens, mask = HFTokenizer(qwen_like).tokenize_messages(messages)
    assert tokens == qwen_template_ids(qwen_like, messages)
    assert len(mask) == len(tokens)
    prompt, _ = HFTokenizer(qwen_like).tokenize_messages(messages, add_generation_prompt=True)
    assert prompt == qwen_template_ids(qwen_like, messages, add_generation_prompt=True)


def test_chatml_mask_trains_assistant_turns_with_im_end(qwen_like):
    tok = HFTokenizer(qwen_like)
    tokens, mask = tok.tokenize_messages(CONVERSATIONS[1])
    trained = tok.decode([t for t, m in zip(tokens, mask) if not m])
    assert trained == (
        "<|im_start|>assistant\n  Llamas hum.\n\n<|im_end|>\n"
        "<|im_start|>assistant\n\n\nThey do. <tool_call><|im_end|>\n"
    )
    masked = tok.decode([t for t, m in zip(tokens, mask) if m])
    assert masked.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n\nName")
    # The tool results of conversation 2 are masked, as one user turn.
    tokens, mask = tok.tokenize_messages(CONVERSATIONS[2])
    assert "<tool_response>" not in tok.decode([t for t, m in zip(tokens, mask) if not m])


def test_chatml_default_system_prompt_and_open_end(qwen_like):
    tok = HFTokenizer(qwen_like)
    tokens, mask = tok.tokenize_messages(CONVERSATIONS[0], add_eos=False)
    assert tok.decode(tokens) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n4."
    )
    assert mask[0] is True and mask[-1] is False
    plain = HFTokenizer(qwen_like, default_system_prompt=None)
    assert plain.decode(plain.tokenize_messages(CONVERSATIONS[0])[0]).startswith("<|im_start|>user\n")


def test_plain_format_and_truncation(qwen_like):
    tok = HFTokenizer(qwen_like, chat_format="none", max_seq_len=5)
    messages = [Message("user", "Once upon", masked=True), Message("assistant", " a time")]
    tokens, mask = HFTokenizer(qwen_like, chat_format="none").tokenize_messages(messages)
    reference = hf_reference(qwen_like, True)
    first, second = (reference.encode(t, add_special_tokens=False).ids for t in ("Once upon", " a time"))
    assert tokens == first + second + [reference.token_to_id("<|endoftext|>")]
    assert mask == [True] * len(first) + [False] * (len(second) + 1)
    assert len(tok.tokenize_messages(messages)[0]) == 5


def test_bad_files_and_inputs(qwen_like, gpt2_like, tmp_path):
    data = json.loads(qwen_like.read_text(encoding="utf-8"))
    with pytest.raises(ValueError, match="not found"):
        HFTokenizer(tmp_path / "missing.json")
    (tmp_path / "spm.model").write_bytes(b"\x0a\x0b\xff binary")
    with pytest.raises(ValueError, match="SentencePieceTokenizer"):
        HFTokenizer(tmp_path / "spm.model")
    with pytest.raises(ValueError, match="chat_format 'llama2' is not known"):
        HFTokenizer(qwen_like, chat_format="llama2")

    def broken(edit) -> str:
        copy = json.loads(json.dumps(data))
        edit(copy)
        path = tmp_path / "broken.json"
        path.write_text(json.dumps(copy), encoding="utf-8")
        return path

    with pytest.raises(ValueError, match="pre_tokenizer"):
        HFTokenizer(broken(lambda d: d.update(pre_tokenizer={"type": "Whitespace"})))
    with pytest.raises(ValueError, match="normalizer"):
        HFTokenizer(broken(lambda d: d.update(normalizer={"type": "Lowercase"})))
    with pytest.raises(ValueError, match="ids must follow the merge order"):
        HFTokenizer(broken(lambda d: d["model"]["merges"].reverse()))
    with pytest.raises(ValueError, match="has no added token '<\\|im_start\\|>'"):
        HFTokenizer(gpt2_like, chat_format="chatml")
    with pytest.raises(ValueError, match="not the numbers"):
        HFTokenizer(broken(lambda d: d["added_tokens"].pop(1)))
    with pytest.raises(ValueError, match="id 99999 at position 1"):
        HFTokenizer(qwen_like).decode([1, 99999])


def test_byte_table_is_gpt2s():
    table = bytes_to_unicode()
    assert (table[ord(" ")], table[ord("\n")], table[ord("!")], table[0], table[255]) == (
        "Ġ",
        "Ċ",
        "!",
        "Ā",
        "ÿ",
    )
    assert len(set(table.values())) == 256


def test_merges_as_strings_load_the_same(qwen_like, tmp_path):
    # Files written before tokenizers 0.20 store merges as "a b" strings instead of pairs.
    data = json.loads(qwen_like.read_text(encoding="utf-8"))
    data["model"]["merges"] = [" ".join(pair) for pair in data["model"]["merges"]]
    old_style = tmp_path / "tokenizer.json"
    old_style.write_text(json.dumps(data), encoding="utf-8")
    for text in TEXTS:
        assert HFTokenizer(old_style).encode(text) == HFTokenizer(qwen_like).encode(text)
