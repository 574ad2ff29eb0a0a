"""The language-model loss as the training loop calls it: (sum of token losses, trained-token count)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ftcore.modules.lora import LoRALinear
from ftcore.modules.loss import chunked_cross_entropy_sum, cross_entropy_sum

if TYPE_CHECKING:
    from ftcore.models.transformer import TransformerDecoder


class LanguageModelLoss:
    """Next-token cross-entropy over the trained tokens, never materializing all logits at once.

    The decoder's final hidden states are projected and scored `chunk_size` tokens at a time (each
    chunk upcast to fp32), so a 128K-entry vocabulary costs one chunk of logits, not the batch's.
    An output projection with a LoRA adapter is applied as a module instead (no shared weight to chunk).
    `skip_ignored=False` scores masked positions as zero instead of dropping them first, so that no
    shape depends on the labels; `cuda_graphs: true` sets it (a graph cannot capture that selection).
    """

    def __init__(self, chunk_size: int = 1024, ignore_index: int = -100, skip_ignored: bool = True):
        if chunk_size < 1:
            raise ValueError(f"loss.chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size, self.ignore_index, self.skip_ignored = chunk_size, ignore_index, skip_ignored

    def __call__(self, model: TransformerDecoder, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = model.hidden(batch["tokens"], input_pos=batch.get("input_pos"), mask=batch.get("mask"))
        labels = batch["labels"]
        if isinstance(model.output, LoRALinear):
            return cross_entropy_sum(model.output(hidden), labels, self.ignore_index)
        return chunked_cross_entropy_sum(
            hidden, model.output_weight, labels, self.chunk_size, self.ignore_index, self.skip_ignored
        )
