"""File reading (line numbers, CSV, Parquet, folders), split strings, and `ftcore data check`."""

from __future__ import annotations

import csv
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ftcore.data import instruct_dataset, text_completion_dataset
from ftcore.data.check import CheckSettings, check_dataset, format_report, main
from ftcore.data.sources import load_rows
from ftcore.data.splits import parse_split, split_indices


def test_json_list_rows_know_their_line(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))  # each object spans 4 lines
    loaded, bad = load_rows(tmp_path / "a.json")
    assert [r.data for r in loaded] == rows and not bad
    assert [r.where.rsplit(":", 1)[1] for r in loaded] == ["2", "6"]


def test_csv_parquet_and_folder_give_the_same_rows(tmp_path, byte_tokenizer):
    texts = ["one, with a comma", "two\nlines", "three"]
    with open(tmp_path / "t.csv", "w", newline="") as f:
        csv.writer(f).writerows([["text"], *([t] for t in texts)])
    pq.write_table(pa.table({"text": texts}), tmp_path / "t.parquet")
    from_csv = text_completion_dataset(byte_tokenizer, str(tmp_path / "t.csv"))
    from_parquet = text_completion_dataset(byte_tokenizer, str(tmp_path / "t.parquet"))
    expected = [byte_tokenizer.encode(t) for t in texts]
    assert [s["tokens"] for s in from_csv] == [s["tokens"] for s in from_parquet] == expected
    rows, _ = load_rows(tmp_path / "t.csv")
    assert [r.where.rsplit(":", 1)[1] for r in rows] == ["2", "3", "5"]  # row 2 spans lines 3-4
    both = text_completion_dataset(byte_tokenizer, str(tmp_path))  # a folder: every data file, sorted
    assert len(both) == 6
    only = text_completion_dataset(byte_tokenizer, str(tmp_path), data_files=["t.parquet"])
    assert len(only) == 3


@pytest.mark.parametrize(
    "text, expected",
    [("train", list(range(10))), ("train[:3]", None), ("train[20%:40%]", None), ("train[7:]", None)],
)
def test_splits_partition_the_rows(text, expected):
    picked = split_indices(10, parse_split(text), seed=0)
    if expected is not None:
        assert picked == expected
    head = split_indices(10, parse_split("train[:70%]"), seed=1)
    tail = split_indices(10, parse_split("train[70%:]"), seed=1)
    assert sorted(head + tail) == list(range(10)) and len(head) == 7
    assert len(split_indices(10, parse_split("train[20%:40%]"), seed=0)) == 2


def test_truncation_counts_and_drops_rows_without_trained_tokens(tmp_path, byte_tokenizer, caplog):
    rows = [{"instruction": "x" * 40, "output": "y"}, {"instruction": "q", "output": "a" * 40}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    dataset = instruct_dataset(byte_tokenizer, str(tmp_path / "a.json"), max_seq_len=20)
    # Row 0: bos + header + 40 prompt bytes already passes 20 tokens: the answer is cut away entirely.
    assert (len(dataset), dataset.dropped_rows, dataset.truncated_rows) == (1, 1, 2)
    assert "dropped 1 row(s)" in caplog.text
    assert len(dataset[0]["tokens"]) == 20 and dataset[0]["labels"][4:] == dataset[0]["tokens"][4:]


def test_check_report_counts_everything(tmp_path, byte_tokenizer):
    good = {"instruction": "Say hi", "input": "", "output": "Hi!"}
    near = {"instruction": "say  HI", "input": "", "output": "hi"}
    long = {"instruction": "Count", "input": "", "output": "1 2 3 " * 30}
    lines = [json.dumps(r) for r in (good, good, near, long)] + [
        '{"instruction": oops}',
        json.dumps({"output": "x"}),
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    settings = CheckSettings(source=str(tmp_path / "d.jsonl"), format="alpaca", max_seq_len=100, packed=True)
    report = check_dataset(byte_tokenizer, settings)
    assert report.rows_read == 6
    assert [w.rsplit(":", 1)[1] for w, _ in report.bad_rows] == ["5", "6"]
    assert [(a.rsplit(":", 1)[1], b.rsplit(":", 1)[1]) for a, b in report.exact_duplicates] == [("2", "1")]
    assert [(a.rsplit(":", 1)[1], b.rsplit(":", 1)[1]) for a, b in report.near_duplicates] == [("3", "1")]
    # bos + user header + text + eot + assistant header + text + eot
    assert report.lengths == [1 + 1 + 6 + 1 + 1 + 3 + 1] * 2 + [
        1 + 1 + 7 + 1 + 1 + 2 + 1,
        1 + 1 + 5 + 1 + 1 + 180 + 1,
    ]
    assert report.truncated == 1 and report.dropped == 0
    assert report.trained_tokens == 2 * (1 + 3 + 1) + (1 + 2 + 1) + (100 - 8)
    text = format_report(report, settings)
    for fragment in ("rows read", "bad rows                         2 (malformed JSON: 1, missing column: 1)",
                     "d.jsonl:5: malformed JSON", "d.jsonl:2 repeats", "nearly repeats",
                     "truncated at max_seq_len=100     1", "tokens per epoch                 142 (unpadded)",
                     "packed                           2 packs x 100"):  # fmt: skip
        assert fragment in text, fragment
    assert re.search(r"1-64 +3  #{40}\n +65-128 +0  \n +129-256 +1  #{13}$", text)  # 40 * 1/3 rounds to 13


def test_check_cli_on_real_sharegpt_file_and_config(tmp_path, assets, capsys):
    data = assets / "data" / "sharegpt_dummy_conversation.json"
    tokenizer = assets / "tokenizers" / "llama3_tokenizer.model"
    args = [str(data), "--format", "sharegpt", "--tokenizer", str(tokenizer), "--max-seq-len", "64"]
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = json.loads(data.read_text())
    assert f"rows read                        {len(rows)}" in out
    assert "bad rows                         0" in out
    config = tmp_path / "c.yaml"
    config.write_text(
        f"tokenizer:\n  _component_: ftcore.data.tokenizers.Llama3Tokenizer\n  path: {tokenizer}\n"
        f"dataset:\n  _component_: ftcore.data.chat_dataset\n  source: {data}\n  max_seq_len: 512\n"
    )
    assert main(["--config", str(config), "dataset.max_seq_len=64"]) == 0
    assert (
        capsys.readouterr().out.splitlines()[1:] == out.splitlines()[1:]
    )  # same table, apart from the source line
    assert (
        main([str(data), "--format", "alpaca", "--tokenizer", str(tokenizer)]) == 1
    )  # every row lacks `instruction`
    assert "missing column: 500" in capsys.readouterr().out


def test_check_cli_reads_a_gguf_files_vocabulary(assets, capsys):
    data = assets / "data" / "alpaca_tiny.json"
    gguf = assets / "models" / "stories260K.gguf"
    assert main([str(data), "--format", "alpaca", "--tokenizer", str(gguf)]) == 0
    assert "bad rows                         0" in capsys.readouterr().out


def test_check_cli_builds_a_config_source_that_is_a_component(tmp_path, capsys):
    # the demo's source is a generator component that writes its rows: checked as a recipe would build it
    overrides = [f"output_dir={tmp_path}", "dataset.source.num_rows=40"]
    assert main(["--config", "demo/reverse_lora", *overrides]) == 0
    out = capsys.readouterr().out
    assert "rows read                        40" in out and str(tmp_path / "data") in out


def test_check_cli_fails_a_file_without_rows(tmp_path, assets, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    tokenizer = assets / "tokenizers" / "llama3_tokenizer.model"
    assert main([str(empty), "--format", "alpaca", "--tokenizer", str(tokenizer)]) == 1
    assert "holds no rows" in capsys.readouterr().out


def test_a_folder_reads_upper_case_suffixes_as_a_single_file_does(tmp_path, byte_tokenizer):
    (tmp_path / "A.JSONL").write_text(json.dumps({"text": "shouted"}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "quiet"}) + "\n")
    assert len(text_completion_dataset(byte_tokenizer, str(tmp_path))) == 2


def test_check_cli_takes_column_map_pairs_repeated_or_together(tmp_path, assets, capsys):
    data = tmp_path / "a.jsonl"
    data.write_text(json.dumps({"q": "Add 2 and 2.", "a": "4"}) + "\n")
    common = [
        str(data),
        "--format",
        "alpaca",
        "--tokenizer",
        str(assets / "tokenizers" / "llama3_tokenizer.model"),
    ]
    assert main([*common, "--column-map", "instruction=q", "--column-map", "output=a"]) == 0
    assert main([*common, "--column-map", "instruction=q", "output=a"]) == 0
    assert "bad rows                         0" in capsys.readouterr().out
