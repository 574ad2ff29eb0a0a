"""Dataset builders, instantiated from config (`_component_: ftcore.data.instruct_dataset`).

Each takes the tokenizer first, then `source` (a file, a folder, or a hub dataset name with
`data_files`), `split` (`train`, `train[:90%]`, ...; sliced splits are shuffled with `seed`),
`max_seq_len`, `column_map` ({name ftcore expects: column in your file}) and `skip_bad_rows`.
Items are `{"tokens", "labels"}` (labels -100 where not trained, not shifted), or with
`packed=True` fixed-length packs (see `ftcore.data.packing`).

The whole file is tokenized at setup: that is what validates it, and what lets truncation report
how many rows it emptied of trained tokens (`dataset.dropped_rows`, also logged).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, cast

from torch.utils.data import Dataset

from ftcore.data.formats import alpaca_to_messages, chat_to_messages, preference_to_messages, text_of
from ftcore.data.packing import PackedDataset
from ftcore.data.pipeline import (
    check_max_seq_len,
    raise_or_skip,
    read_examples,
    report_counts,
    tokenize_row,
)

log = logging.getLogger("ftcore")


class TokenizedDataset(Dataset):
    """Map-style dataset of already tokenized samples, with the setup counts a user wants to see."""

    def __init__(
        self,
        samples: list[dict[str, list[int]]],
        *,
        skipped_rows: int,
        dropped_rows: int,
        truncated_rows: int,
    ):
        self.samples = samples
        self.skipped_rows = skipped_rows  # bad rows skipped under skip_bad_rows
        self.dropped_rows = dropped_rows  # rows left with no trained token after truncation
        self.truncated_rows = truncated_rows

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.samples[index]


def instruct_dataset(
    tokenizer: Any,
    source: str,
    *,
    split: str = "train",
    seed: int = 0,
    max_seq_len: int | None = None,
    train_on_input: bool = False,
    packed: bool = False,
    skip_bad_rows: bool = False,
    column_map: dict[str, str] | None = None,
    data_files: str | list[str] | None = None,
) -> Dataset:
    """Alpaca rows {instruction, input (optional), output}; the user turn is masked unless train_on_input."""
    options = dict(locals())
    return _sft_dataset(convert=alpaca_to_messages, **options)


def chat_dataset(
    tokenizer: Any,
    source: str,
    *,
    conversation_style: str = "auto",
    split: str = "train",
    seed: int = 0,
    max_seq_len: int | None = None,
    train_on_input: bool = False,
    packed: bool = False,
    skip_bad_rows: bool = False,
    column_map: dict[str, str] | None = None,
    data_files: str | list[str] | None = None,
) -> Dataset:
    """ShareGPT {conversations: [{from, value}]} or OpenAI {messages: [{role, content}]} rows;
    `conversation_style` sharegpt|openai|auto. Only assistant turns are trained unless train_on_input."""
    options = dict(locals())
    convert = functools.partial(chat_to_messages, style=options.pop("conversation_style"))
    return _sft_dataset(convert=convert, **options)


def text_completion_dataset(
    tokenizer: Any,
    source: str,
    *,
    split: str = "train",
    seed: int = 0,
    max_seq_len: int | None = None,
    packed: bool = False,
    skip_bad_rows: bool = False,
    column_map: dict[str, str] | None = None,
    data_files: str | list[str] | None = None,
) -> Dataset:
    """Plain text in a `text` column (map yours with column_map); every token is trained."""
    options = dict(locals())
    return _sft_dataset(convert=_text_example, train_on_input=True, **options)


def _text_example(row: dict[str, Any], train_on_input: bool) -> str:
    return text_of(row)


def _sft_dataset(
    tokenizer: Any,
    source: str,
    *,
    convert: Callable[..., Any],
    split: str = "train",
    seed: int = 0,
    max_seq_len: int | None = None,
    train_on_input: bool = False,
    packed: bool = False,
    skip_bad_rows: bool = False,
    column_map: dict[str, str] | None = None,
    data_files: str | list[str] | None = None,
) -> Dataset:
    check_max_seq_len(max_seq_len)
    if packed and max_seq_len is None:
        raise ValueError("packed: true needs max_seq_len (the length of every pack); set dataset.max_seq_len")
    result = read_examples(
        source,
        lambda row: convert(row, train_on_input=train_on_input),
        split=split,
        seed=seed,
        data_files=data_files,
        column_map=_plain(column_map),
    )
    raise_or_skip(result.bad_rows, skip_bad_rows, source)
    samples, truncated, dropped = [], 0, 0
    for where, example in result.examples:
        item = tokenize_row(tokenizer, example, max_seq_len, where)
        truncated += item.full_length > len(item.tokens)
        if item.trained_tokens == 0:
            dropped += 1
            continue
        samples.append({"tokens": item.tokens, "labels": item.labels})
    report_counts(source, len(samples), truncated, dropped)
    counts = {"skipped_rows": len(result.bad_rows), "dropped_rows": dropped, "truncated_rows": truncated}
    if packed:
        # max_seq_len is set: checked at the top for packed=True
        return PackedDataset(samples, max_seq_len=cast(int, max_seq_len), pad_id=tokenizer.pad_id, **counts)
    return TokenizedDataset(samples, **counts)


def preference_dataset(
    tokenizer: Any,
    source: str,
    *,
    split: str = "train",
    seed: int = 0,
    max_seq_len: int | None = None,
    train_on_input: bool = False,
    skip_bad_rows: bool = False,
    column_map: dict[str, str] | None = None,
    data_files: str | list[str] | None = None,
    conversation_style: str = "auto",
) -> Dataset:
    """Preference pairs: a prompt (`prompt` text, or `conversations`/`messages`) with `chosen` and
    `rejected` answers. Items {"chosen_tokens", "chosen_labels", "rejected_tokens", "rejected_labels"}.
    For {question, response_j, response_k}: column_map {prompt: question, chosen: response_j, rejected: response_k}."""
    check_max_seq_len(max_seq_len)
    convert = functools.partial(
        preference_to_messages, style=conversation_style, train_on_input=train_on_input
    )
    result = read_examples(
        source, convert, split=split, seed=seed, data_files=data_files, column_map=_plain(column_map)
    )
    raise_or_skip(result.bad_rows, skip_bad_rows, source)
    samples, truncated, dropped, alike = [], 0, 0, []
    for where, (chosen_messages, rejected_messages) in result.examples:
        chosen = tokenize_row(tokenizer, chosen_messages, max_seq_len, where)
        rejected = tokenize_row(tokenizer, rejected_messages, max_seq_len, where)
        truncated += chosen.full_length > len(chosen.tokens) or rejected.full_length > len(rejected.tokens)
        if chosen.trained_tokens == 0 or rejected.trained_tokens == 0:
            dropped += 1  # a pair is only useful while both answers keep trained tokens
            continue
        if chosen.tokens == rejected.tokens:  # answers alike up to max_seq_len: loss log 2, no gradient
            alike.append(where)
            continue
        samples.append(
            {
                "chosen_tokens": chosen.tokens,
                "chosen_labels": chosen.labels,
                "rejected_tokens": rejected.tokens,
                "rejected_labels": rejected.labels,
            }
        )
    report_counts(source, len(samples), truncated, dropped)
    if alike:
        log.warning(
            "%s: dropped %d pair(s) whose chosen and rejected answers are the same tokens up to max_seq_len "
            "(first: %s); where the answers differ past max_seq_len, raise it to tell them apart", source, len(alike), alike[0],
        )  # fmt: skip
    return TokenizedDataset(
        samples,
        skipped_rows=len(result.bad_rows),
        dropped_rows=dropped + len(alike),
        truncated_rows=truncated,
    )


def _plain(column_map: Any) -> dict[str, str] | None:
    """An OmegaConf DictConfig from the config becomes a plain dict of str."""
    if column_map is None:
        return None
    try:
        return {str(k): str(v) for k, v in column_map.items()}
    except AttributeError:
        raise ValueError(
            f"column_map must be a mapping {{expected_name: column_in_file}}, got {column_map!r}"
        ) from None
