"""Collate functions: lists of samples -> batch tensors.

padded_collate      {"tokens", "labels"} (B, T), right-padded to the longest sample or `pad_to`;
                    packed samples are handed to packed_collate
packed_collate      + "input_pos" (B, T) and a block-causal "mask" (B, T, T), True = may attend
preference_collate  chosen then rejected stacked: "tokens", "labels" (2B, T)
"""

from __future__ import annotations

import torch

from ftcore.data.pipeline import IGNORE_INDEX


def padded_collate(
    batch: list[dict[str, list[int]]],
    pad_id: int,
    ignore_index: int = IGNORE_INDEX,
    pad_to: int | None = None,
) -> dict[str, torch.Tensor]:
    if not batch:
        raise ValueError("padded_collate got an empty batch")
    if "document_ids" in batch[0]:
        return packed_collate(batch)
    return {
        "tokens": _pad_right([s["tokens"] for s in batch], pad_id, pad_to),
        "labels": _pad_right([s["labels"] for s in batch], ignore_index, pad_to),
    }


def packed_collate(batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    document_ids = torch.tensor([s["document_ids"] for s in batch])  # (B, T)
    seq_len = document_ids.shape[1]
    causal = torch.tril(torch.ones(seq_len, seq_len, dtype=torch.bool))  # (T, T)
    same_document = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
    return {
        "tokens": torch.tensor([s["tokens"] for s in batch]),
        "labels": torch.tensor([s["labels"] for s in batch]),
        "input_pos": torch.tensor([s["input_pos"] for s in batch]),
        "mask": same_document & causal,
    }


def preference_collate(
    batch: list[dict[str, list[int]]], pad_id: int, ignore_index: int = IGNORE_INDEX
) -> dict[str, torch.Tensor]:
    """Rows 0..B-1 are the chosen answers, rows B..2B-1 the rejected ones, padded to one length."""
    tokens = [s["chosen_tokens"] for s in batch] + [s["rejected_tokens"] for s in batch]
    labels = [s["chosen_labels"] for s in batch] + [s["rejected_labels"] for s in batch]
    return {"tokens": _pad_right(tokens, pad_id, None), "labels": _pad_right(labels, ignore_index, None)}


def _pad_right(sequences: list[list[int]], value: int, pad_to: int | None) -> torch.Tensor:
    longest = max(len(s) for s in sequences)
    length = longest if pad_to is None else pad_to
    if longest > length:
        raise ValueError(
            f"a sample of {longest} tokens is longer than pad_to={pad_to}; raise pad_to or lower max_seq_len"
        )
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        out[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    return out
