"""`ftcore data check`: what is in a dataset, and what is wrong with it, before any GPU time is spent.

    ftcore data check --config CONFIG [key=value ...]      the config's `dataset` and `tokenizer`
    ftcore data check FILE --format FMT --tokenizer PATH [--max-seq-len N] [--column-map a=b ...]
        (PATH: a Llama 3 tiktoken file, a SentencePiece model, a tokenizer.json or a .gguf)

Prints one table: rows read, bad rows (file:line and reason), exact and near duplicates, token
length histogram, truncation, trained tokens and tokens per epoch. Exit status 1 when any row is bad
or there is none (so it can gate a CI job), else 0.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftcore.data.formats import alpaca_to_messages, chat_to_messages, preference_to_messages, text_of
from ftcore.data.messages import Message
from ftcore.data.pipeline import read_examples, tokenize_row

FORMATS = ("alpaca", "sharegpt", "openai", "text", "preference")
BUILDER_FORMATS = {  # config `_component_` -> format
    "instruct_dataset": "alpaca",
    "chat_dataset": "chat",
    "text_completion_dataset": "text",
    "preference_dataset": "preference",
}
MAX_LISTED = 20


@dataclass
class CheckSettings:
    source: str
    format: str  # alpaca | sharegpt | openai | auto (chat) | text | preference
    max_seq_len: int | None = None
    train_on_input: bool = False
    packed: bool = False
    split: str = "train"
    seed: int = 0
    column_map: dict[str, str] | None = None
    data_files: Any = None


@dataclass
class Report:
    rows_read: int = 0
    bad_rows: list[tuple[str, str]] = field(default_factory=list)
    exact_duplicates: list[tuple[str, str]] = field(default_factory=list)  # (row, first seen at)
    near_duplicates: list[tuple[str, str]] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # per sequence, before truncation
    kept_lengths: list[int] = field(default_factory=list)  # after truncation, rows kept
    truncated: int = 0
    dropped: int = 0
    trained_tokens: int = 0


def converter(fmt: str, train_on_input: bool) -> Callable[[dict[str, Any]], Any]:
    if fmt == "alpaca":
        return functools.partial(alpaca_to_messages, train_on_input=train_on_input)
    if fmt in ("sharegpt", "openai", "auto"):
        return functools.partial(chat_to_messages, style=fmt, train_on_input=train_on_input)
    if fmt == "text":
        return text_of
    if fmt == "preference":
        return functools.partial(preference_to_messages, train_on_input=train_on_input)
    raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def check_dataset(tokenizer: Any, settings: CheckSettings) -> Report:
    result = read_examples(
        settings.source,
        converter(settings.format, settings.train_on_input),
        split=settings.split,
        seed=settings.seed,
        data_files=settings.data_files,
        column_map=settings.column_map,
    )
    report = Report(rows_read=result.rows_read, bad_rows=[(b.where, b.reason) for b in result.bad_rows])
    _find_duplicates(report, result.examples)
    for where, example in result.examples:
        sequences = list(example) if isinstance(example, tuple) else [example]  # preference: chosen, rejected
        items = [tokenize_row(tokenizer, seq, settings.max_seq_len, where) for seq in sequences]
        report.lengths += [item.full_length for item in items]
        report.truncated += any(item.full_length > len(item.tokens) for item in items)
        if any(item.trained_tokens == 0 for item in items):
            report.dropped += 1
            continue
        report.kept_lengths += [len(item.tokens) for item in items]
        report.trained_tokens += sum(item.trained_tokens for item in items)
    return report


def _find_duplicates(report: Report, examples: list[tuple[str, Any]]) -> None:
    exact: dict[str, str] = {}
    near: dict[str, str] = {}
    for where, example in examples:
        text = _render(example)
        key = _normalise(text)
        if text in exact:
            report.exact_duplicates.append((where, exact[text]))
        elif key in near:
            report.near_duplicates.append((where, near[key]))
        exact.setdefault(text, where)
        near.setdefault(key, where)


def _render(example: Any) -> str:
    if isinstance(example, str):
        return example
    if isinstance(example, tuple):
        return "\n--\n".join(_render(part) for part in example)
    return "\n".join(f"{m.role}: {m.content}" for m in example if isinstance(m, Message))


def _normalise(text: str) -> str:
    """Near duplicates differ only in case, punctuation and whitespace."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def format_report(report: Report, settings: CheckSettings) -> str:
    limit = "none" if settings.max_seq_len is None else str(settings.max_seq_len)
    kept = report.kept_lengths
    rows = [
        ("source", f"{settings.source} ({settings.format}, split {settings.split})"),
        ("rows read", report.rows_read),
        ("bad rows", f"{len(report.bad_rows)}{_kinds(report.bad_rows)}"),
        ("exact duplicates", len(report.exact_duplicates)),
        ("near duplicates", f"{len(report.near_duplicates)} (same text up to case, punctuation, spacing)"),
        ("sequences tokenized", len(report.lengths)),
        ("tokens per sequence", _stats(report.lengths)),
        (f"truncated at max_seq_len={limit}", report.truncated),
        ("dropped (no trained token left)", report.dropped),
        ("trained tokens", report.trained_tokens),
        ("tokens per epoch", f"{sum(kept)} (unpadded)"),
    ]
    if settings.packed and settings.max_seq_len:
        packs = _count_packs(kept, settings.max_seq_len)
        rows.append(
            ("packed", f"{packs} packs x {settings.max_seq_len} = {packs * settings.max_seq_len} tokens")
        )
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines += _listing("bad rows", report.bad_rows, lambda r: f"{r[0]}: {r[1]}")
    lines += _listing("exact duplicates", report.exact_duplicates, lambda d: f"{d[0]} repeats {d[1]}")
    lines += _listing("near duplicates", report.near_duplicates, lambda d: f"{d[0]} nearly repeats {d[1]}")
    lines += ["", "token length histogram (before truncation)", *_histogram(report.lengths)]
    return "\n".join(lines)


def _kinds(bad_rows: list[tuple[str, str]]) -> str:
    kinds = {"malformed JSON": 0, "missing column": 0, "empty": 0, "null": 0, "role": 0, "other": 0}
    for _, reason in bad_rows:
        kind = next(
            (k for k in ("malformed JSON", "missing column", "empty", "null", "role") if k in reason), "other"
        )
        kinds[kind] += 1
    found = [f"{name}: {count}" for name, count in kinds.items() if count]
    return f" ({', '.join(found)})" if found else ""


def _stats(lengths: list[int]) -> str:
    if not lengths:
        return "-"
    ordered = sorted(lengths)
    median = ordered[len(ordered) // 2]
    return f"min {ordered[0]}, median {median}, mean {sum(ordered) / len(ordered):.1f}, max {ordered[-1]}"


def _listing(title: str, items: list, show: Callable[[Any], str]) -> list[str]:
    if not items:
        return []
    lines = ["", f"{title}:"] + [f"  {show(item)}" for item in items[:MAX_LISTED]]
    if len(items) > MAX_LISTED:
        lines.append(f"  ... and {len(items) - MAX_LISTED} more")
    return lines


def _histogram(lengths: list[int], bar_width: int = 40) -> list[str]:
    """Power-of-two buckets: (0, 64], (64, 128], ..."""
    if not lengths:
        return ["  (no rows)"]
    edges = [64]
    while edges[-1] < max(lengths):
        edges.append(edges[-1] * 2)
    counts = [0] * len(edges)
    for length in lengths:
        counts[next(i for i, edge in enumerate(edges) if length <= edge)] += 1
    top = max(counts)
    lines = []
    for i, (edge, count) in enumerate(zip(edges, counts)):
        low = edges[i - 1] + 1 if i else 1
        lines.append(f"  {low:>6}-{edge:<6} {count:>7}  {'#' * round(bar_width * count / top)}")
    return lines


def _count_packs(lengths: list[int], max_seq_len: int) -> int:
    """The greedy packing of ftcore.data.packing, counted without building the packs."""
    packs, used = 0, max_seq_len
    for length in lengths:
        if used + length > max_seq_len:
            packs, used = packs + 1, 0
        used += length
    return packs


def load_tokenizer(path: str) -> Any:
    """A GGUF file's vocabulary (`.gguf`), a Hugging Face `tokenizer.json` (`.json`, ChatML), a Llama 3
    tiktoken rank file (lines `base64 rank`) or a SentencePiece model."""
    from ftcore.data.tokenizers import HFTokenizer, Llama3Tokenizer, SentencePieceTokenizer, gguf_tokenizer

    if path.endswith(".gguf"):
        return gguf_tokenizer(path)
    if path.endswith(".json"):
        return HFTokenizer(path)
    with open(path, "rb") as f:
        first_line = f.readline(200)
    if re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\r?\n?", first_line):
        return Llama3Tokenizer(path)
    return SentencePieceTokenizer(path)


def settings_from_config(argv_config: str, overrides: list[str]) -> tuple[Any, CheckSettings]:
    from ftcore.config import apply_overrides, instantiate, load_config
    from ftcore.config.instantiate import to_plain

    cfg = apply_overrides(load_config(argv_config), overrides)
    for key in ("dataset", "tokenizer"):
        if key not in cfg:
            raise ValueError(
                f"config {argv_config} has no `{key}` section; `ftcore data check --config` needs both"
            )
    node = to_plain(cfg.dataset)
    builder = str(node.get("_component_", "")).rsplit(".", 1)[-1]
    if builder not in BUILDER_FORMATS:
        raise ValueError(
            f"dataset `_component_` {node.get('_component_')!r} is not one of ftcore.data.{', '.join(BUILDER_FORMATS)}"
        )
    fmt = BUILDER_FORMATS[builder]
    if fmt == "chat":
        fmt = node.get("conversation_style", "auto")
    source = node["source"]
    if isinstance(source, dict) and "_component_" in source:  # built, as the recipes build it (the demo's
        source = instantiate(cfg.dataset.source)  # generator writes its rows and returns the file)
    settings = CheckSettings(
        source=source,
        format=fmt,
        max_seq_len=node.get("max_seq_len"),
        train_on_input=node.get("train_on_input", fmt == "text"),
        packed=node.get("packed", False),
        split=node.get("split", "train"),
        seed=node.get("seed", 0),
        column_map=node.get("column_map"),
        data_files=node.get("data_files"),
    )
    return instantiate(cfg.tokenizer), settings


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ftcore data check", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", nargs="?", help="data file or folder (instead of --config)")
    parser.add_argument("--config", help="a config with `dataset` and `tokenizer` sections")
    parser.add_argument("--format", choices=FORMATS, help="row format of FILE")
    parser.add_argument(
        "--tokenizer", help="tokenizer file: Llama 3 tiktoken, SentencePiece, tokenizer.json or a .gguf"
    )
    parser.add_argument("--max-seq-len", type=int, default=None)
    parser.add_argument("--train-on-input", action="store_true")
    parser.add_argument("--packed", action="store_true", help="also report the packs of max_seq_len")
    parser.add_argument("--split", default="train")
    parser.add_argument("--column-map", nargs="+", action="extend", default=[], metavar="EXPECTED=IN_FILE")
    args, overrides = parser.parse_known_args(argv)
    if args.config is not None and args.file is not None:
        overrides.insert(0, args.file)  # with --config, the first `key=value` lands in FILE
        args.file = None
    args.overrides = overrides
    if args.config is None and (args.file is None or args.format is None or args.tokenizer is None):
        parser.error("give --config CONFIG, or FILE with --format and --tokenizer")
    if any("=" not in pair for pair in args.column_map):
        parser.error(f"--column-map takes EXPECTED=IN_FILE pairs, got {args.column_map}")
    if args.config is None and overrides:
        parser.error(f"unknown arguments {overrides} (key=value overrides need --config)")
    return args


def main(argv: list[str]) -> int:
    args = _parse_args(argv)
    try:
        if args.config:
            tokenizer, settings = settings_from_config(args.config, args.overrides)
        else:
            column_map = dict(pair.split("=", 1) for pair in args.column_map) or None
            fmt = args.format
            settings = CheckSettings(
                source=str(Path(args.file)),
                format=fmt,
                max_seq_len=args.max_seq_len,
                train_on_input=args.train_on_input or fmt == "text",
                packed=args.packed,
                split=args.split,
                column_map=column_map,
            )
            tokenizer = load_tokenizer(args.tokenizer)
        report = check_dataset(tokenizer, settings)
    except ValueError as e:
        print(f"ftcore data check: {e}")
        return 2
    print(format_report(report, settings))
    if report.rows_read == 0:  # a recipe would refuse it: nothing to train on
        print(
            f"ftcore data check: {settings.source} holds no rows (split {settings.split}); nothing to train on"
        )
        return 1
    return 1 if report.bad_rows else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
