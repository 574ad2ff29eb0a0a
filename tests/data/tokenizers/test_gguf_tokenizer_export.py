"""A GGUF base's vocabulary written as `tokenizer.model` (for the HF-layout checkpoints ftcore saves):
sentencepiece, the format's own implementation, must read the file and tokenize exactly as ftcore's
GGUF tokenizer does, over real text (GSM8K questions) and whitespace/Unicode edge cases."""

from __future__ import annotations

import json

import pytest
import sentencepiece as spm

from ftcore.data.tokenizers.gguf import gguf_tokenizer
from ftcore.data.tokenizers.sentencepiece_model import sentencepiece_model_bytes, tokenizer_config_json

EDGE_CASES = ["", " x", "  two leading", "trailing  ", "a  b", "tab\tand\nnewline", "café naïve 日本 🙂"]


@pytest.fixture
def stories_vocab(assets):
    return gguf_tokenizer(str(assets / "models" / "stories260K.gguf"))


def test_sentencepiece_reads_the_written_model_and_tokenizes_as_ftcore(stories_vocab, gsm8k_questions):
    processor = spm.SentencePieceProcessor(model_proto=sentencepiece_model_bytes(stories_vocab))
    assert (processor.vocab_size(), processor.bos_id(), processor.eos_id(), processor.unk_id()) == (
        512,
        1,
        2,
        0,
    )
    assert [processor.id_to_piece(i) for i in range(512)] == stories_vocab.pieces
    texts = gsm8k_questions + EDGE_CASES
    differing = [
        t for t in texts if processor.encode(t) != stories_vocab.encode(t, add_bos=False, add_eos=False)
    ]
    assert differing == []
    for text in EDGE_CASES:
        assert processor.decode(stories_vocab.encode(text)) == stories_vocab.decode(
            stories_vocab.encode(text)
        )


def test_tokenizer_config_names_the_special_pieces(stories_vocab):
    config = json.loads(tokenizer_config_json(stories_vocab))
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")
    assert config["tokenizer_class"] == "LlamaTokenizer"


def test_long_answers_tokenize_as_sentencepiece_does(stories_vocab, assets):
    # dpo_en_demo's answers run to thousands of characters: the merge order over long inputs (a heap of
    # candidate pairs) must still be SentencePiece's, highest score first and leftmost among equals.
    processor = spm.SentencePieceProcessor(model_proto=sentencepiece_model_bytes(stories_vocab))
    rows = json.loads((assets / "data" / "dpo_en_demo.json").read_text())
    answers = [row[side]["value"] for row in rows[:60] for side in ("chosen", "rejected")]
    assert max(len(a) for a in answers) > 3000
    for answer in answers:
        assert stories_vocab.encode(answer, add_bos=False, add_eos=False) == processor.encode(answer)
