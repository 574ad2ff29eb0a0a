"""Read rows from local files (JSON list, JSONL, Parquet, CSV) or a Hugging Face dataset.

Every row keeps where it came from (`file:line`), so a bad row can be named precisely. Rows that
cannot be parsed at all (a broken JSONL line, a list item that is not an object) are returned as
`BadRow`s next to the good ones: the caller decides whether to raise or skip them.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftcore.config.input_paths import looks_local

SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class SourceRow:
    where: str  # "path:line" (JSON, JSONL, CSV) or "path:row N" (Parquet, hub datasets)
    data: dict[str, Any]


@dataclass(frozen=True)
class BadRow:
    where: str
    reason: str


def load_rows(
    source: str | Path, data_files: str | list[str] | None = None, hub_split: str = "train"
) -> tuple[list[SourceRow], list[BadRow]]:
    """All rows of `source` (a file, a folder of data files, or a hub dataset name), in file order.

    `hub_split` names the split of a hub dataset; local files are one split, "train"."""
    path = Path(source).expanduser()
    if path.is_file():
        return _read_file(path)
    if path.is_dir():
        files = _data_files_in(path, data_files)
        rows: list[SourceRow] = []
        bad: list[BadRow] = []
        for file in files:
            file_rows, file_bad = _read_file(file)
            rows += file_rows
            bad += file_bad
        return rows, bad
    if looks_local(str(source)):
        raise ValueError(
            f"dataset source {str(source)!r} does not exist (no such file or folder, looked for at "
            f"{path.absolute()}); check the path, or give a hub dataset name such as 'tatsu-lab/alpaca'"
        )
    return _read_hub(str(source), data_files, hub_split), []


def _data_files_in(folder: Path, data_files: str | list[str] | None) -> list[Path]:
    if data_files is not None:
        names = [data_files] if isinstance(data_files, str) else list(data_files)
        files = [folder / name for name in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"data_files not found in {folder}: {missing}")
        return files
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in SUFFIXES)  # as _read_file matches
    if not files:
        raise ValueError(f"{folder} holds no data file ({', '.join(SUFFIXES)}); point `source` at a file")
    return files


def _read_file(path: Path) -> tuple[list[SourceRow], list[BadRow]]:
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(
            f"{path}: unknown data file type {path.suffix!r}; use one of {', '.join(SUFFIXES)} "
            "(rename the file if its content is one of these)"
        )
    if kind == "parquet":
        return _read_parquet(path), []
    text = path.read_text(encoding="utf-8")
    if kind == "csv":
        return _read_csv(path, text), []
    if kind == "jsonl" or not text.lstrip().startswith("["):
        return _read_jsonl(path, text)
    return _read_json_list(path, text)


def _read_jsonl(path: Path, text: str) -> tuple[list[SourceRow], list[BadRow]]:
    rows: list[SourceRow]
    bad: list[BadRow]
    rows, bad = [], []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            at = "" if e.msg.endswith(" at") else " at"  # "Unterminated string starting at" ends in one
            bad.append(
                BadRow(where, f"malformed JSON ({e.msg}{at} column {e.colno}); fix or delete the line")
            )
            continue
        _append_item(rows, bad, where, item)
    return rows, bad


def _read_json_list(path: Path, text: str) -> tuple[list[SourceRow], list[BadRow]]:
    """Decode a top-level JSON list item by item, so each row knows its line number (and, where rows
    share lines, as in a list written on one line, its row number)."""
    items = _json_list_items(path, text)  # (line, item)
    shared_lines = len({line for line, _ in items}) < len(items)
    rows: list[SourceRow] = []
    bad: list[BadRow] = []
    for number, (line, item) in enumerate(items, start=1):
        _append_item(rows, bad, f"{path}:{line}" + (f" (row {number})" if shared_lines else ""), item)
    return rows, bad


def _json_list_items(path: Path, text: str) -> list[tuple[int, object]]:
    decoder = json.JSONDecoder()
    items: list[tuple[int, object]] = []
    pos = text.index("[") + 1
    expect_item = True
    while True:
        pos = _skip_space(text, pos)
        if pos >= len(text):
            raise _json_error(path, text, pos, "the file ends before the closing ']'")
        char = text[pos]
        if char == "]" and (not expect_item or not items):
            break
        if char == "," and not expect_item:
            pos, expect_item = pos + 1, True
            continue
        if not expect_item:
            raise _json_error(path, text, pos, f"expected ',' or ']' between rows, found {char!r}")
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise _json_error(path, text, e.pos, e.msg) from None
        items.append((_line_of(text, pos), item))
        pos, expect_item = end, False
    if text[pos + 1 :].strip():
        raise _json_error(path, text, _skip_space(text, pos + 1), "extra data after the closing ']'")
    return items


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _json_error(path: Path, text: str, pos: int, msg: str) -> ValueError:
    line = _line_of(text, pos)
    column = pos - text.rfind("\n", 0, pos)
    return ValueError(
        f"{path}:{line}:{column}: malformed JSON: {msg}. A broken JSON list cannot be read past this "
        "point; fix the file (or store one object per line as JSONL, where a bad line can be skipped)"
    )


def _append_item(rows: list[SourceRow], bad: list[BadRow], where: str, item: Any) -> None:
    if isinstance(item, dict):
        rows.append(SourceRow(where, item))
    else:
        bad.append(BadRow(where, f"row is a JSON {type(item).__name__}, expected an object {{...}}"))


def _read_csv(path: Path, text: str) -> list[SourceRow]:
    reader = csv.DictReader(text.splitlines(keepends=True))
    rows = []
    line_no = 1
    for record in reader:
        rows.append(SourceRow(f"{path}:{line_no + 1}", dict(record)))
        line_no = reader.line_num
    return rows


def _read_parquet(path: Path) -> list[SourceRow]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ValueError(f"{path}: reading Parquet needs pyarrow; `pip install pyarrow`") from e
    table = pq.read_table(path)
    return [SourceRow(f"{path}:row {i}", record) for i, record in enumerate(table.to_pylist())]


def _read_hub(name: str, data_files: str | list[str] | None, split: str) -> list[SourceRow]:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"source {name!r} is neither a local file nor a folder, and the `datasets` package that "
            "reads hub datasets is not installed: give a local path, or `pip install datasets`"
        ) from None
    try:
        loaded = datasets.load_dataset(name, data_files=data_files, split=split)
    except Exception as e:  # the hub client raises many types (offline, auth, 404): report them all alike
        raise ValueError(
            f"could not load dataset {name!r} from the Hugging Face hub or its cache ({type(e).__name__}: {e}). "
            "Offline, download it first or point `source` at a local file"
        ) from e
    return [SourceRow(f"{name}:row {i}", dict(record)) for i, record in enumerate(loaded)]
