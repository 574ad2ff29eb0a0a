"""SentencePieceTokenizer against independent references.

References, none of them ftcore code:
- ids published in transformers' LlamaTokenizer docstring for the Llama 2 file;
- transformers' LlamaTokenizer (a `tokenizers` BPE converted from the same .model file, legacy mode);
- Meta's Llama 2 chat format (llama/generation.py `chat_completion` facts: each exchange is one
  SentencePiece encode of "[INST] u [/INST] a " framed by <s> ... </s>), computed here with the
  sentencepiece library directly, and the Llama-2-chat Jinja template rendered and tokenized by HF;
- Mistral 7B Instruct v0.1/v0.2's Jinja template rendered and tokenized by HF's LlamaTokenizer built
  from the Mistral file, and Mistral's v1 instruct layout (mistral-common facts: one <s>, then
  encode("[INST] u [/INST]"), encode(answer) + </s> per exchange) computed with sentencepiece.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest
import sentencepiece as spm

from ftcore.data.messages import Message
from ftcore.data.tokenizers import SentencePieceTokenizer

LLAMA2 = "tokenizers/llama2_tokenizer.model"
MISTRAL = "tokenizers/mistral_v1_tokenizer.model"
SMALL = "tokenizers/m.model"

# The chat template of meta-llama/Llama-2-7b-chat-hf (tokenizer_config.json).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

# The chat template of mistralai/Mistral-7B-Instruct-v0.1 and -v0.2 (the same in both).
MISTRAL_INSTRUCT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{- raise_exception('alternate') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('roles') }}{%- endif %}{%- endfor %}"
)

# Texts where HF's conversion and SentencePiece agree. HF's Metaspace does not add the word-start
# "▁" to text that already starts with a space and breaks ties between "▁▁"-merges differently, so
# runs of spaces are checked by round trip instead (test_whitespace_round_trips).
TEXTS = [
    "Hello world",
    "12345 and 3.14159",
    "naïve café Ελληνικά русский 日本語のテキスト 한국어",
    "🦙🔥👍🏽 emoji",
    "I'm sure you don't know, WE'LL see",
    "def f(x):\n\treturn x**2\n\nprint(f(3))",
]


@functools.cache
def ours(path: Path, chat_format: str = "llama2") -> SentencePieceTokenizer:
    return SentencePieceTokenizer(path, chat_format=chat_format)


@functools.cache
def hf_reference(path: Path):
    from transformers import LlamaTokenizer

    folder = Path(tempfile.mkdtemp(prefix="ftcore_sp_ref_"))
    (folder / "tokenizer.model").symlink_to(path)  # HF loads a folder; link, never copy, the asset
    return LlamaTokenizer.from_pretrained(folder, legacy=True)


def test_published_ids(assets):
    tok = ours(assets / LLAMA2)
    assert tok.encode("Hello this is a test", add_eos=False) == [1, 15043, 445, 338, 263, 1243]
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.stop_tokens) == (32000, 1, 2, [2])
    assert tok.pad_id == 0  # Llama 2 defines no pad piece: <unk> is used, see the class docstring


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_hf_llama_tokenizer(assets, text):
    path = assets / LLAMA2
    ids = ours(path).encode(text, add_bos=False, add_eos=False)
    assert ids == hf_reference(path)(text, add_special_tokens=False).input_ids
    assert ours(path).decode(ids) == text


def test_special_text_is_not_a_control_token(assets):
    tok = ours(assets / LLAMA2)
    ids = tok.encode("<s> and </s> are text here", add_bos=False, add_eos=False)
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == "<s> and </s> are text here"


@pytest.mark.parametrize("text", ["  two  spaces", " lead", "a\t\tb   c\n\n\n d  "])
def test_whitespace_round_trips(assets, text):
    tok = ours(assets / LLAMA2)
    assert tok.decode(tok.encode(text)) == text


CONVERSATIONS = [
    [Message("user", "What is 2 + 2?", masked=True), Message("assistant", "4.")],
    [
        Message("system", "You are terse.", masked=True),
        Message("user", "\nName a llama fact 🦙", masked=True),
        Message("assistant", " Llamas hum. "),
        Message("user", "I'm curious: don't they spit?", masked=True),
        Message("assistant", "They do.\n"),
    ],
    [Message("system", "Be brief.", masked=True), Message("user", "Hi", masked=True)],
    [
        Message("user", "One", masked=True),
        Message("assistant", "Two"),
        Message("user", "Three?", masked=True),
    ],
]


def meta_llama2_dialog(sp: spm.SentencePieceProcessor, messages: list[Message]) -> list[int]:
    """Meta's chat_completion, from its published facts."""
    dialog = [{"role": m.role, "content": m.content} for m in messages]
    if dialog[0]["role"] == "system":
        merged = "<<SYS>>\n" + dialog[0]["content"] + "\n<</SYS>>\n\n" + dialog[1]["content"]
        dialog = [{"role": "user", "content": merged}] + dialog[2:]
    ids: list[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        text = f"[INST] {prompt['content'].strip()} [/INST] {answer['content'].strip()} "
        ids += [sp.bos_id()] + sp.encode(text) + [sp.eos_id()]
    if len(dialog) % 2 == 1:
        ids += [sp.bos_id()] + sp.encode(f"[INST] {dialog[-1]['content'].strip()} [/INST]")
    return ids


def hf_llama2_template(path: Path, messages: list[Message]) -> list[int]:
    import jinja2

    template = jinja2.Environment().from_string(LLAMA2_CHAT_TEMPLATE)
    text = template.render(
        messages=[{"role": m.role, "content": m.content} for m in messages], bos_token="<s>", eos_token="</s>"
    )
    return hf_reference(path)(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_llama2_chat_matches_meta_and_hf_template(assets, conversation):
    path = assets / LLAMA2
    messages = CONVERSATIONS[conversation]
    tokens, mask = ours(path).tokenize_messages(messages)
    assert tokens == meta_llama2_dialog(spm.SentencePieceProcessor(model_file=str(path)), messages)
    assert tokens == hf_llama2_template(path, messages)
    assert len(mask) == len(tokens)


def test_llama2_chat_with_space_runs_matches_meta(assets):
    # HF's conversion splits runs of spaces differently from SentencePiece (see TEXTS), so only
    # Meta's format is the reference here.
    path = assets / LLAMA2
    messages = [
        Message("system", "Two  spaces  here.", masked=True),
        Message("user", "  and   here  ", masked=True),
        Message("assistant", "ok  then"),
    ]
    tokens, _ = ours(path).tokenize_messages(messages)
    assert tokens == meta_llama2_dialog(spm.SentencePieceProcessor(model_file=str(path)), messages)


def test_llama2_mask_trains_answers_and_their_eos(assets):
    tok = ours(assets / LLAMA2)
    tokens, mask = tok.tokenize_messages(CONVERSATIONS[0])
    trained = [t for t, m in zip(tokens, mask) if not m]
    assert tok.decode(trained) == "4. "  # Meta's format ends an answer with a space, then </s>
    assert trained[-1] == tok.eos_id
    assert mask == [True] * (len(tokens) - len(trained)) + [False] * len(trained)


def test_add_eos_false_leaves_answer_open(assets):
    tok = ours(assets / LLAMA2)
    tokens, _ = tok.tokenize_messages(CONVERSATIONS[0], add_eos=False)
    assert tokens == [tok.bos_id] + tok.encode(
        "[INST] What is 2 + 2? [/INST] 4.", add_bos=False, add_eos=False
    )


def test_llama2_format_rejects_bad_turn_order(assets):
    tok = ours(assets / SMALL)
    with pytest.raises(ValueError, match="taking turns"):
        tok.tokenize_messages([Message("user", "a"), Message("user", "b")])
    with pytest.raises(ValueError, match="taking turns"):
        tok.tokenize_messages([Message("user", "a"), Message("tool", "b")])


def test_plain_format_concatenates_contents(assets):
    tok = ours(assets / SMALL, chat_format="none")
    messages = [Message("user", "Once upon", masked=True), Message("assistant", "a time")]
    tokens, mask = tok.tokenize_messages(messages)
    sp = spm.SentencePieceProcessor(model_file=str(assets / SMALL))
    assert tokens == [1] + sp.encode("Once upon") + sp.encode("a time") + [2]
    assert mask == [True] * (1 + len(sp.encode("Once upon"))) + [False] * (len(sp.encode("a time")) + 1)


def test_mistral_file_loads(assets):
    tok = ours(assets / MISTRAL)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (32000, 1, 2, 0)
    assert tok.decode(tok.encode("Bonjour, ça va? 123")) == "Bonjour, ça va? 123"


def test_max_seq_len_and_bad_inputs(assets, tmp_path):
    tok = SentencePieceTokenizer(assets / SMALL, max_seq_len=4)
    tokens, mask = tok.tokenize_messages(CONVERSATIONS[1])
    assert len(tokens) == len(mask) == 4
    with pytest.raises(ValueError, match="chat_format 'chatml' is not known"):
        SentencePieceTokenizer(assets / SMALL, chat_format="chatml")
    with pytest.raises(ValueError, match="Llama3Tokenizer"):
        SentencePieceTokenizer(assets / "tokenizers/tiktoken_small.model")
    with pytest.raises(ValueError, match="not found"):
        SentencePieceTokenizer(tmp_path / "nope.model")
    with pytest.raises(ValueError, match="id -1 at position 0"):
        tok.decode([-1])


def mistral_v1_dialog(sp: spm.SentencePieceProcessor, messages: list[Message]) -> list[int]:
    """Mistral's v1 instruct layout (mistral-common), from its published facts."""
    dialog = [(m.role, m.content) for m in messages]
    if dialog[0][0] == "system":
        dialog = [("user", dialog[0][1] + "\n\n" + dialog[1][1])] + dialog[2:]
    ids = [sp.bos_id()]
    for role, content in dialog:
        ids += (
            sp.encode(f"[INST] {content} [/INST]") if role == "user" else sp.encode(content) + [sp.eos_id()]
        )
    return ids


def hf_mistral_template(path: Path, messages: list[Message]) -> list[int]:
    import jinja2

    def raise_exception(message):
        raise ValueError(message)

    environment = jinja2.Environment()
    environment.globals["raise_exception"] = raise_exception
    text = environment.from_string(MISTRAL_INSTRUCT_TEMPLATE).render(
        messages=[{"role": m.role, "content": m.content} for m in messages], bos_token="<s>", eos_token="</s>"
    )
    return hf_reference(path)(text, add_special_tokens=False).input_ids


# Conversation 1 starts an answer with a space: HF's conversion tokenizes the template's "  Llamas"
# differently from SentencePiece (see TEXTS), so it is checked against Mistral's layout only, below.
MISTRAL_CONVERSATIONS = [
    CONVERSATIONS[0],
    CONVERSATIONS[2],
    CONVERSATIONS[3],
    [
        Message("system", "Réponds en français.", masked=True),
        Message("user", "Quelle heure est-il? 🕒", masked=True),
        Message("assistant", "Il est 12h30.\nBonne journée!"),
        Message("user", "Merci\n\nEt demain?\n", masked=True),
        Message("assistant", "Demain, 9h."),
        Message("user", "Code: `x = [1, 2]`", masked=True),
    ],
]


@pytest.mark.parametrize("conversation", range(len(MISTRAL_CONVERSATIONS)))
def test_mistral_chat_matches_template_and_mistral_layout(assets, conversation):
    path = assets / MISTRAL
    messages = MISTRAL_CONVERSATIONS[conversation]
    tokens, mask = ours(path, "mistral").tokenize_messages(messages)
    assert tokens == hf_mistral_template(path, messages)
    assert tokens == mistral_v1_dialog(spm.SentencePieceProcessor(model_file=str(path)), messages)
    assert len(mask) == len(tokens)


def test_mistral_layout_mask_and_open_end(assets):
    tok = ours(assets / MISTRAL, "mistral")
    messages = CONVERSATIONS[1]
    tokens, mask = tok.tokenize_messages(messages)
    assert tokens == mistral_v1_dialog(spm.SentencePieceProcessor(model_file=str(assets / MISTRAL)), messages)
    assert tokens.count(tok.bos_id) == 1 and tokens.count(tok.eos_id) == 2  # one <s>, </s> per answer
    trained = [t for t, m in zip(tokens, mask) if not m]
    sp = spm.SentencePieceProcessor(model_file=str(assets / MISTRAL))
    assert trained == sp.encode(" Llamas hum. ") + [2] + sp.encode("They do.\n") + [2]
    assert sp.decode(tokens) == (
        "[INST] You are terse.\n\n\nName a llama fact 🦙 [/INST]  Llamas hum.  "
        "[INST] I'm curious: don't they spit? [/INST] They do.\n"
    )
    open_tokens, _ = tok.tokenize_messages(messages, add_eos=False)
    assert open_tokens == tokens[:-1]
    with pytest.raises(ValueError, match="Mistral chat format needs user and assistant"):
        tok.tokenize_messages([Message("user", "a"), Message("tool", "b")])


def test_a_file_of_another_kind_is_refused_with_what_it_looks_like(assets, tmp_path):
    with pytest.raises(ValueError, match="looks like a tiktoken file.*Llama3Tokenizer"):
        SentencePieceTokenizer(assets / "tokenizers" / "llama3_tokenizer.model")
    config = tmp_path / "config.json"
    config.write_text('{"hidden_size": 64}\n')
    with pytest.raises(ValueError, match="is not a SentencePiece model.*checkpoint's tokenizer.model"):
        SentencePieceTokenizer(config)
