"""A corpus of broken data files: each must fail at setup with its own specific message, naming the
file and line (or the setting) and the fix; `skip_bad_rows` skips and counts instead."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from ftcore.data import chat_dataset, instruct_dataset, preference_dataset, text_completion_dataset

GOOD_ALPACA = {"instruction": "Add 2 and 2.", "input": "", "output": "4"}
GOOD_CHAT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}


def rows_json(*rows) -> str:
    return "[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n"


def chat(*turns, key="conversations") -> dict:
    return {key: list(turns)}


H = {"from": "human", "value": "Hi"}
G = {"from": "gpt", "value": "Hello"}

# (id, file name, content, builder, builder kwargs, fragments the message must contain)
CASES = [
    ("missing-comma", "a.json", '[\n{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n]',
     instruct_dataset, {}, ["a.json:3:1: malformed JSON", "expected ',' or ']'"]),
    ("unterminated-list", "a.json", rows_json(GOOD_ALPACA)[:-3],
     instruct_dataset, {}, ["a.json:", "ends before the closing ']'"]),
    ("trailing-comma", "a.json", '[\n{"instruction": "a", "output": "b"},\n]',
     instruct_dataset, {}, ["a.json:3:1: malformed JSON: Expecting value"]),
    ("extra-data", "a.json", rows_json(GOOD_ALPACA) + "[]",
     instruct_dataset, {}, ["extra data after the closing ']'"]),
    ("bad-jsonl-line", "a.jsonl", json.dumps(GOOD_ALPACA) + '\n{"instruction": "x", "output": \n',
     instruct_dataset, {}, ["a.jsonl:2: malformed JSON", "fix or delete the line"]),
    ("unterminated-jsonl-string", "a.jsonl", json.dumps(GOOD_ALPACA) + '\n{"instruction": "x, "output": "y"}\n',
     instruct_dataset, {}, ["a.jsonl:2: malformed JSON (Expecting ',' delimiter at column 22)"]),
    ("unterminated-jsonl-string-end", "a.jsonl", json.dumps(GOOD_ALPACA) + '\n{"instruction": "x\n',
     instruct_dataset, {}, ["a.jsonl:2: malformed JSON (Unterminated string starting at column 17)"]),
    ("row-not-object", "a.json", rows_json(GOOD_ALPACA, ["instruction", "output"]),
     instruct_dataset, {}, ["a.json:3: row is a JSON list, expected an object"]),
    ("missing-column", "a.json", rows_json(GOOD_ALPACA, {"instruction": "a", "response": "b"}),
     instruct_dataset, {}, ["a.json:3: missing column 'output'", "'instruction', 'response'", "column_map"]),
    ("one-line-list", "a.json", json.dumps([GOOD_ALPACA, GOOD_ALPACA, {"instruction": "a"}]),
     instruct_dataset, {}, ["a.json:1 (row 3): missing column 'output'"]),
    ("empty-output", "a.json", rows_json({"instruction": "a", "output": "  "}),
     instruct_dataset, {}, ["a.json:2: column 'output' is empty"]),
    ("null-instruction", "a.json", rows_json({"instruction": None, "output": "b"}),
     instruct_dataset, {}, ["a.json:2: column 'instruction' is null"]),
    ("number-output", "a.jsonl", json.dumps({"instruction": "a", "output": 4}),
     instruct_dataset, {}, ["a.jsonl:1: column 'output' must be a string, got int"]),
    ("column-map-typo", "a.json", rows_json({"question": "a", "answer": "b"}),
     instruct_dataset, {"column_map": {"instruction": "prompt", "output": "answer"}},
     ["a.json:2: column_map maps 'instruction' to column 'prompt'", "'question', 'answer'"]),
    ("column-map-null", "a.json", rows_json({"question": None, "answer": "b"}),
     instruct_dataset, {"column_map": {"instruction": "question", "output": "answer"}},
     ["a.json:2: column 'instruction' is null", "(column_map: 'instruction' is your 'question')"]),
    ("wrong-role", "c.json", rows_json(GOOD_CHAT, chat(H, {"from": "bot", "value": "x"})),
     chat_dataset, {}, ["c.json:3: conversations[1] has role 'bot'", "'gpt', 'human'"]),
    ("empty-conversation", "c.json", rows_json(chat()),
     chat_dataset, {}, ["c.json:2: 'conversations' is an empty conversation"]),
    ("no-assistant-turn", "c.json", rows_json(chat(H)),
     chat_dataset, {}, ["c.json:2: 'conversations' has no assistant turn"]),
    ("late-system", "c.json", rows_json(chat(H, G, {"from": "system", "value": "Be brief"}, H, G)),
     chat_dataset, {}, ["conversations[2] is a system message after the first turn", "move it to the start"]),
    ("missing-value-key", "c.json", rows_json(chat(H, {"from": "gpt", "text": "x"})),
     chat_dataset, {"conversation_style": "sharegpt"}, ["conversations[1] lacks the key 'value'"]),
    ("two-assistant-turns", "c.json", rows_json(chat(H, G, G)),
     chat_dataset, {}, ["c.json:2: 'conversations': messages[2] is an assistant message after an assistant"]),
    ("openai-wrong-role", "o.jsonl", json.dumps(chat({"role": "human", "content": "Hi"}, key="messages")),
     chat_dataset, {"conversation_style": "openai"}, ["o.jsonl:1: messages[0] has role 'human'", "'user'"]),
    ("openai-null-content", "o.jsonl",
     json.dumps(chat({"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}, key="messages")),
     chat_dataset, {}, ["o.jsonl:1: messages[1].content is null"]),
    ("conversation-not-list", "c.json", rows_json({"conversations": "Hi there"}),
     chat_dataset, {}, ["'conversations' must be a list of messages, got str"]),
    ("no-conversation-column", "c.json", rows_json({"dialog": []}),
     chat_dataset, {}, ["missing column 'conversations' or 'messages'", "'dialog'"]),
    ("preference-missing-rejected", "p.json", rows_json({"prompt": "q", "chosen": "a"}),
     preference_dataset, {}, ["p.json:2: missing column 'rejected'"]),
    ("preference-ends-with-user", "p.json", rows_json({"prompt": "q", "chosen": "a", "rejected": {"from": "human", "value": "b"}}),
     preference_dataset, {}, ["'rejected' must end with an assistant answer"]),
    ("csv-empty-text", "t.csv", "text,source\nhello world,a\n,b\n",
     text_completion_dataset, {}, ["t.csv:3: column 'text' is empty"]),
    ("unknown-extension", "a.txt", "hello", text_completion_dataset, {}, ["a.txt: unknown data file type '.txt'"]),
    ("local-validation-split", "a.json", rows_json(GOOD_ALPACA),
     instruct_dataset, {"split": "validation"}, ["a local file holds one split", "train[90%:]"]),
    ("bad-split-bound", "a.json", rows_json(GOOD_ALPACA),
     instruct_dataset, {"split": "train[a:]"}, ["bound 'a' must be a row count"]),
    ("packed-without-length", "a.json", rows_json(GOOD_ALPACA),
     instruct_dataset, {"packed": True}, ["packed: true needs max_seq_len"]),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_broken_file_names_file_row_and_fix(case, tmp_path, byte_tokenizer):
    _, name, content, builder, kwargs, fragments = case
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError) as error:
        builder(byte_tokenizer, str(tmp_path / name), **kwargs)
    message = str(error.value).replace(str(tmp_path) + "/", "")
    for fragment in fragments:
        assert fragment in message


def test_corpus_is_large_and_every_message_differs():
    assert len(CASES) >= 15
    assert len({tuple(c[5]) for c in CASES}) == len(CASES)


def test_bad_rows_name_the_fix_and_the_skip_option(tmp_path, byte_tokenizer):
    (tmp_path / "a.json").write_text(rows_json(GOOD_ALPACA, {"instruction": "a", "output": ""}))
    with pytest.raises(ValueError, match="set `skip_bad_rows: true`"):
        instruct_dataset(byte_tokenizer, str(tmp_path / "a.json"))


def test_skip_bad_rows_skips_counts_and_logs(tmp_path, byte_tokenizer, caplog):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(GOOD_CHAT), "{broken", json.dumps(chat(H)), json.dumps(GOOD_CHAT), json.dumps(chat())]
    path.write_text("\n".join(lines))
    with caplog.at_level(logging.WARNING):
        dataset = chat_dataset(byte_tokenizer, str(path), skip_bad_rows=True)
    assert len(dataset) == 2 and dataset.skipped_rows == 3
    assert "skipped 3 bad row(s)" in caplog.text and "mixed.jsonl:2: malformed JSON" in caplog.text


def test_empty_folder_and_missing_hub_library(tmp_path, byte_tokenizer, monkeypatch):
    with pytest.raises(ValueError, match="holds no data file"):
        instruct_dataset(byte_tokenizer, str(tmp_path))
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if `datasets` were not installed
    with pytest.raises(ValueError, match="neither a local file nor a folder.*pip install datasets"):
        instruct_dataset(byte_tokenizer, "tatsu-lab/alpaca")


@pytest.mark.parametrize("source", ["/no/such/rows.json", "./rows.jsonl", "data/rows.csv"])
def test_a_missing_local_path_is_reported_as_missing_not_as_a_hub_name(source, byte_tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ValueError, match=f"dataset source '{source}' does not exist.*looked for at"):
        instruct_dataset(byte_tokenizer, source)
