"""Packing: several samples per fixed-length sequence, with no attention or loss across them.

Greedy, in dataset order: a sample goes into the current pack while it fits, else a new pack starts.
Each pack is exactly `max_seq_len` long; the tail is padding (pad_id, label -100) that forms its own
document. Positions restart at 0 per document and `document_ids` tell `packed_collate` where the
block-causal mask must cut.

The first label of every document is set to -100. The loss shifts labels left by one, so that label
would be predicted from the *previous* document's last token; without a pack it is never predicted at
all (it sits at position 0). Ignoring it makes the packed loss equal the unpacked loss exactly.
"""

from __future__ import annotations

from torch.utils.data import Dataset

from ftcore.data.pipeline import IGNORE_INDEX


def pack_samples(
    samples: list[dict[str, list[int]]], max_seq_len: int, pad_id: int
) -> list[dict[str, list[int]]]:
    packs: list[dict[str, list[int]]] = []
    current = _empty_pack()
    for sample in samples:
        length = len(sample["tokens"])
        if length > max_seq_len:
            raise ValueError(
                f"a sample of {length} tokens exceeds max_seq_len={max_seq_len}; truncate samples before packing"
            )
        if len(current["tokens"]) + length > max_seq_len:
            packs.append(_pad(current, max_seq_len, pad_id))
            current = _empty_pack()
        _add_document(current, sample["tokens"], sample["labels"])
    if current["tokens"]:
        packs.append(_pad(current, max_seq_len, pad_id))
    return packs


def _empty_pack() -> dict[str, list[int]]:
    return {"tokens": [], "labels": [], "input_pos": [], "document_ids": []}


def _add_document(pack: dict[str, list[int]], tokens: list[int], labels: list[int]) -> None:
    doc_id = pack["document_ids"][-1] + 1 if pack["document_ids"] else 0
    pack["tokens"] += tokens
    pack["labels"] += [IGNORE_INDEX] + labels[1:]
    pack["input_pos"] += range(len(tokens))
    pack["document_ids"] += [doc_id] * len(tokens)


def _pad(pack: dict[str, list[int]], max_seq_len: int, pad_id: int) -> dict[str, list[int]]:
    pad = max_seq_len - len(pack["tokens"])
    if pad:
        # Padding is one more document: it attends only to itself, so no softmax row is empty.
        _add_document(pack, [pad_id] * pad, [IGNORE_INDEX] * pad)
    return pack


class PackedDataset(Dataset):
    """Packs of exactly `max_seq_len`: {"tokens", "labels", "input_pos", "document_ids"}."""

    def __init__(
        self,
        samples: list[dict[str, list[int]]],
        *,
        max_seq_len: int,
        pad_id: int,
        skipped_rows: int = 0,
        dropped_rows: int = 0,
        truncated_rows: int = 0,
    ):
        self.packs = pack_samples(samples, max_seq_len, pad_id)
        self.num_samples = len(samples)
        self.skipped_rows = skipped_rows
        self.dropped_rows = dropped_rows
        self.truncated_rows = truncated_rows

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.packs[index]
