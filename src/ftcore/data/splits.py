"""Split strings in the Hugging Face `datasets` style: `train`, `train[:90%]`, `train[90%:]`, `train[10:200]`.

A sliced split first shuffles the row order with `seed`, then slices; so `train[:90%]` and
`train[90%:]` with the same seed are disjoint, cover every row, and do not depend on the order of the
file (a file sorted by topic would otherwise give a validation set of one topic). An unsliced split
keeps the file order.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

_SPLIT = re.compile(r"^\s*(?P<name>[A-Za-z_][\w.-]*)\s*(\[(?P<start>[^:\]]*):(?P<stop>[^:\]]*)\])?\s*$")
_BOUND = re.compile(r"^\s*(?P<value>-?\d+(\.\d+)?)\s*(?P<pct>%)?\s*$")


@dataclass(frozen=True)
class Split:
    name: str
    start: tuple[float, bool] | None = None  # (value, is_percent)
    stop: tuple[float, bool] | None = None

    @property
    def sliced(self) -> bool:
        return self.start is not None or self.stop is not None


def parse_split(text: str) -> Split:
    match = _SPLIT.match(text)
    if match is None:
        raise ValueError(
            f"split {text!r} is not understood; write e.g. 'train', 'train[:90%]', 'train[90%:]' or 'train[0:500]'"
        )
    if match.group("start") is None:
        return Split(match.group("name"))
    return Split(
        match.group("name"), _parse_bound(text, match.group("start")), _parse_bound(text, match.group("stop"))
    )


def _parse_bound(text: str, bound: str) -> tuple[float, bool] | None:
    if not bound.strip():
        return None
    match = _BOUND.match(bound)
    if match is None:
        raise ValueError(f"split {text!r}: bound {bound!r} must be a row count (500) or a percentage (90%)")
    value, is_pct = float(match.group("value")), match.group("pct") is not None
    if is_pct and not 0 <= value <= 100:
        raise ValueError(f"split {text!r}: percentage {bound!r} must lie between 0% and 100%")
    if not is_pct and value != int(value):
        raise ValueError(
            f"split {text!r}: row bound {bound!r} must be a whole number (or add % for a percentage)"
        )
    return value, is_pct


def split_indices(num_rows: int, split: Split, seed: int) -> list[int]:
    """Indices of the rows in `split`, out of `num_rows` rows."""
    indices = list(range(num_rows))
    if not split.sliced:
        return indices
    random.Random(seed).shuffle(indices)
    start = _resolve(split.start, num_rows, default=0)
    stop = _resolve(split.stop, num_rows, default=num_rows)
    return indices[start:stop]


def _resolve(bound: tuple[float, bool] | None, num_rows: int, default: int) -> int:
    if bound is None:
        return default
    value, is_pct = bound
    # Rounding the same boundary the same way on both sides keeps [:p%] and [p%:] complementary.
    return round(num_rows * value / 100) if is_pct else int(value)
