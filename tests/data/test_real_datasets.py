"""Real files from ../shared/assets/data through the real Llama 3 tokenizer.

The expected ids come from an independent reference: Meta's official Llama 3 chat template (the Jinja
text of Meta-Llama-3-8B-Instruct's tokenizer_config.json) rendered with jinja2, then encoded in one
go by tiktoken over the same rank file, as Hugging Face tokenizers do.
"""

from __future__ import annotations

import json

import jinja2
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from ftcore.data import chat_dataset, instruct_dataset, preference_dataset, text_completion_dataset

# Meta's Llama 3 pre-tokenizer regex and the official chat template (data, from Meta's release).
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
OFFICIAL_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
)
SPECIALS = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|start_header_id|>": 128006,
            "<|end_header_id|>": 128007, "<|eot_id|>": 128009}  # fmt: skip
ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"


def official_ids(llama3_tokenizer, messages: list[dict[str, str]]) -> list[int]:
    encoding = tiktoken.Encoding(
        "llama3-reference",
        pat_str=LLAMA3_REGEX,
        mergeable_ranks=load_tiktoken_bpe(str(llama3_tokenizer.path)),
        special_tokens=SPECIALS,
    )
    text = jinja2.Template(OFFICIAL_TEMPLATE).render(messages=messages, bos_token="<|begin_of_text|>")
    return encoding.encode(text, allowed_special="all")


def trained_text(tokenizer, item: dict[str, list[int]]) -> str:
    return tokenizer.decode([label for label in item["labels"] if label != -100])


def test_alpaca_row_ids_and_mask_match_official_template(llama3_tokenizer, data_dir):
    rows = json.loads((data_dir / "alpaca_tiny.json").read_text())
    dataset = instruct_dataset(llama3_tokenizer, str(data_dir / "alpaca_tiny.json"))
    assert len(dataset) == 100
    for index in (0, 5):  # row 5 has a non-empty `input`
        row, item = rows[index], dataset[index]
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        expected = official_ids(
            llama3_tokenizer,
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}],
        )
        assert item["tokens"] == expected
        # Trained: the assistant turn (header, answer, end of turn); everything before is -100.
        assert trained_text(llama3_tokenizer, item) == ASSISTANT_HEADER + row["output"].strip() + "<|eot_id|>"
        first_trained = next(i for i, label in enumerate(item["labels"]) if label != -100)
        assert item["tokens"][first_trained - 1] == 128009  # the user turn's <|eot_id|> is not trained
        assert item["labels"][first_trained:] == item["tokens"][first_trained:]
    assert rows[5]["input"], "row 5 was picked for its input"


def test_alpaca_train_on_input_trains_everything_but_bos(llama3_tokenizer, data_dir):
    item = instruct_dataset(llama3_tokenizer, str(data_dir / "alpaca_tiny.json"), train_on_input=True)[0]
    assert item["labels"][0] == -100 and item["labels"][1:] == item["tokens"][1:]


def test_sharegpt_multi_turn_matches_official_template(llama3_tokenizer, data_dir):
    rows = json.loads((data_dir / "sharegpt_dummy_conversation.json").read_text())
    dataset = chat_dataset(llama3_tokenizer, str(data_dir / "sharegpt_dummy_conversation.json"))
    role = {"human": "user", "gpt": "assistant"}
    row = next(r for r in rows if len(r["conversations"]) == 6)
    item = dataset[rows.index(row)]
    turns = [{"role": role[t["from"]], "content": t["value"]} for t in row["conversations"]]
    assert item["tokens"] == official_ids(llama3_tokenizer, turns)
    expected_trained = "".join(
        ASSISTANT_HEADER + t["content"].strip() + "<|eot_id|>" for t in turns if t["role"] == "assistant"
    )
    assert trained_text(llama3_tokenizer, item) == expected_trained


def test_chat_system_prompt_and_openai_style(llama3_tokenizer, data_dir, tmp_path):
    rows = json.loads((data_dir / "chat_tiny.json").read_text())
    openai_rows = [
        {"messages": [{"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), "content": t["value"]}
                      for t in r["conversations"]]}
        for r in rows
    ]  # fmt: skip
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in openai_rows))
    sharegpt = chat_dataset(llama3_tokenizer, str(data_dir / "chat_tiny.json"), conversation_style="sharegpt")
    openai = chat_dataset(llama3_tokenizer, str(tmp_path / "chat.jsonl"), conversation_style="openai")
    assert sharegpt[0] == openai[0]
    assert sharegpt[0]["tokens"] == official_ids(llama3_tokenizer, openai_rows[0]["messages"])
    assert trained_text(llama3_tokenizer, sharegpt[0]).count(ASSISTANT_HEADER) == 2
    assert "system" not in trained_text(llama3_tokenizer, sharegpt[0])


def test_dpo_demo_pairs(llama3_tokenizer, data_dir):
    rows = json.loads((data_dir / "dpo_en_demo.json").read_text())
    dataset = preference_dataset(llama3_tokenizer, str(data_dir / "dpo_en_demo.json"))
    assert len(dataset) == 300 and dataset.dropped_rows == 0
    index = next(i for i, r in enumerate(rows) if r["conversations"][0]["from"] == "system")
    row, item = rows[index], dataset[index]
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    prompt = [{"role": role[t["from"]], "content": t["value"]} for t in row["conversations"]]
    for side in ("chosen", "rejected"):
        answer = {"role": "assistant", "content": row[side]["value"]}
        assert item[f"{side}_tokens"] == official_ids(llama3_tokenizer, prompt + [answer])
        trained = llama3_tokenizer.decode([t for t in item[f"{side}_labels"] if t != -100])
        assert trained == ASSISTANT_HEADER + row[side]["value"].strip() + "<|eot_id|>"


def test_stack_exchange_pairs_via_column_map_and_truncation_drops(llama3_tokenizer, data_dir):
    path = str(data_dir / "stack_exchange_paired_tiny.json")
    columns = {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
    full = preference_dataset(llama3_tokenizer, path, column_map=columns)
    assert len(full) == 25
    row = json.loads((data_dir / "stack_exchange_paired_tiny.json").read_text())[0]
    assert llama3_tokenizer.decode(full[0]["chosen_tokens"]).endswith(
        row["response_j"].strip() + "<|eot_id|>"
    )
    # With room for only the question, pairs whose answers start past max_seq_len are dropped and counted.
    prompt_lengths = sorted(
        next(i for i, x in enumerate(item["chosen_labels"]) if x != -100) for item in full
    )
    cut = prompt_lengths[len(prompt_lengths) // 2]
    short = preference_dataset(llama3_tokenizer, path, column_map=columns, max_seq_len=cut)
    assert short.dropped_rows == sum(1 for p in prompt_lengths if p >= cut) > 0
    assert len(short) + short.dropped_rows == 25
    assert all(max(len(i["chosen_tokens"]), len(i["rejected_tokens"])) <= cut for i in short)


def test_gsm8k_split_is_disjoint_complete_and_seeded(llama3_tokenizer, data_dir):
    path = str(data_dir / "gsm8k_test.jsonl")
    columns = {"instruction": "question", "output": "answer"}
    train = instruct_dataset(llama3_tokenizer, path, column_map=columns, split="train[:90%]", seed=3)
    val = instruct_dataset(llama3_tokenizer, path, column_map=columns, split="train[90%:]", seed=3)
    assert (len(train), len(val)) == (1187, 132)  # 1,319 rows, round(0.9 * 1319) = 1187
    seen = {tuple(s["tokens"]) for s in train}
    assert not any(tuple(s["tokens"]) in seen for s in val)
    again = instruct_dataset(llama3_tokenizer, path, column_map=columns, split="train[90%:]", seed=3)
    other = instruct_dataset(llama3_tokenizer, path, column_map=columns, split="train[90%:]", seed=4)
    assert [s["tokens"] for s in again] == [s["tokens"] for s in val]
    assert [s["tokens"] for s in other] != [s["tokens"] for s in val]
    answer = json.loads(open(path).readline())["answer"]
    assert trained_text(
        llama3_tokenizer, instruct_dataset(llama3_tokenizer, path, column_map=columns)[0]
    ).endswith(answer.strip() + "<|eot_id|>")


def test_text_completion_trains_every_token_after_bos(llama3_tokenizer, data_dir):
    path = str(data_dir / "gsm8k_test.jsonl")
    item = text_completion_dataset(llama3_tokenizer, path, column_map={"text": "answer"}, max_seq_len=16)[0]
    answer = json.loads(open(path).readline())["answer"]
    assert item["tokens"] == llama3_tokenizer.encode(answer)[:16]
    assert item["labels"] == item["tokens"]
