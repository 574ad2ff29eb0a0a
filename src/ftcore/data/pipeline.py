"""The steps every dataset builder shares: read, validate every row, split, tokenize, truncate.

Validation runs over the whole file at setup, so a bad row fails the run before any GPU time is
spent, not on row 91,000 mid-epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftcore.data.formats import RowError, apply_column_map
from ftcore.data.messages import Message
from ftcore.data.sources import BadRow, load_rows
from ftcore.data.splits import parse_split, split_indices

IGNORE_INDEX = -100
MAX_ERRORS_SHOWN = 5
log = logging.getLogger(__name__)

Example = Any  # list[Message] | str | tuple[list[Message], list[Message]], per format


@dataclass(frozen=True)
class ReadResult:
    examples: list[tuple[str, Example]]  # (where, example) of the rows in the split, in order
    bad_rows: list[BadRow]  # over the whole file, not just the split
    rows_read: int


def read_examples(
    source: str | Path,
    to_example: Callable[[dict[str, Any]], Example],
    *,
    split: str = "train",
    seed: int = 0,
    data_files: str | list[str] | None = None,
    column_map: dict[str, str] | None = None,
) -> ReadResult:
    """Read and convert every row of `source`; bad rows are collected, never raised here."""
    spec = parse_split(split)
    if Path(source).expanduser().exists() and spec.name != "train":
        raise ValueError(
            f"split {split!r}: a local file holds one split, 'train'; take a slice such as 'train[90%:]' "
            "or give the validation rows their own file"
        )
    rows, bad = load_rows(source, data_files, hub_split=spec.name)
    converted: list[tuple[str, Example] | None] = []
    for row in rows:
        try:
            mapped = apply_column_map(row.data, column_map)
        except RowError as e:
            bad.append(BadRow(row.where, str(e)))
            converted.append(None)
            continue
        try:
            converted.append((row.where, to_example(mapped)))
        except RowError as e:
            bad.append(BadRow(row.where, str(e) + _file_names_of(str(e), column_map)))
            converted.append(None)
    chosen = [converted[i] for i in split_indices(len(rows), spec, seed)]
    return ReadResult([item for item in chosen if item is not None], bad, len(rows) + _unparsed(bad, rows))


def _file_names_of(reason: str, column_map: dict[str, str] | None) -> str:
    """The messages name ftcore's columns; after a rename, say which of the file's columns they are."""
    named = [
        f"{expected!r} is your {in_file!r}"
        for expected, in_file in (column_map or {}).items()
        if repr(expected) in reason
    ]
    return f" (column_map: {', '.join(named)})" if named else ""


def _unparsed(bad: list[BadRow], rows: list) -> int:
    """Rows that never became dicts (broken JSONL lines) still count as rows read."""
    parsed = {row.where for row in rows}
    return sum(1 for b in bad if b.where not in parsed)


def raise_or_skip(bad_rows: list[BadRow], skip_bad_rows: bool, source: str | Path) -> None:
    if not bad_rows:
        return
    shown = "\n".join(f"  {b.where}: {b.reason}" for b in bad_rows[:MAX_ERRORS_SHOWN])
    more = f"\n  ... and {len(bad_rows) - MAX_ERRORS_SHOWN} more" if len(bad_rows) > MAX_ERRORS_SHOWN else ""
    if not skip_bad_rows:
        raise ValueError(
            f"{source}: {len(bad_rows)} bad row(s):\n{shown}{more}\n"
            "Fix these rows, or set `skip_bad_rows: true` on the dataset to skip them "
            "(`ftcore data check` lists them all)"
        )
    log.warning("%s: skipped %d bad row(s) (skip_bad_rows: true):\n%s%s", source, len(bad_rows), shown, more)


@dataclass(frozen=True)
class Tokenized:
    tokens: list[int]
    labels: list[int]
    full_length: int  # before truncation

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def tokenize(tokenizer: Any, example: list[Message] | str, max_seq_len: int | None) -> Tokenized:
    """Tokens and labels (= token where trained, -100 elsewhere; not shifted), cut to max_seq_len."""
    if isinstance(example, str):
        tokens = tokenizer.encode(example, add_bos=True, add_eos=True)
        mask = [False] * len(tokens)  # continued pretraining trains on the whole text
    else:
        tokens, mask = tokenizer.tokenize_messages(example, add_eos=True)
    labels = [IGNORE_INDEX if masked else token for token, masked in zip(tokens, mask)]
    full_length = len(tokens)
    if max_seq_len is not None:
        tokens, labels = tokens[:max_seq_len], labels[:max_seq_len]
    return Tokenized(list(tokens), labels, full_length)


def tokenize_row(
    tokenizer: Any, example: list[Message] | str, max_seq_len: int | None, where: str
) -> Tokenized:
    """`tokenize`, with the row named when the tokenizer rejects it."""
    try:
        return tokenize(tokenizer, example, max_seq_len)
    except ValueError as e:
        raise ValueError(f"{where}: the tokenizer rejected this row: {e}") from e


def check_max_seq_len(max_seq_len: int | None) -> None:
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 2):
        raise ValueError(f"max_seq_len must be an integer >= 2 (or null for no limit), got {max_seq_len!r}")


def report_counts(source: str | Path, kept: int, truncated: int, dropped: int) -> None:
    """Log what truncation did; dropped rows lost every trained token to max_seq_len."""
    log.info("%s: %d samples, %d truncated to max_seq_len", source, kept, truncated)
    if dropped:
        log.warning(
            "%s: dropped %d row(s) whose trained tokens all lay beyond max_seq_len; raise max_seq_len to keep them",
            source,
            dropped,
        )
