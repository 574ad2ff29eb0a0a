"""Gradient accumulation whose loss is normalised by the trained tokens of the WHOLE accumulated batch.

Averaging each micro-batch's mean loss weights a micro-batch with 3 trained tokens as much as one
with 300, so accumulating k micro-batches would not equal one batch of k times the size (the bug
behind torchtune #2307 and the HF transformers fix of 2024). Instead: count the trained tokens of all
micro-batches first, then backpropagate each micro-batch's `sum_loss / total`. The gradients then
equal those of the mean token loss over the concatenated batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ftcore.modules.loss import IGNORE_INDEX


def count_trained_tokens(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """Trained tokens in unshifted labels (B, T): positions 1..T-1 not equal to ignore_index."""
    return int((labels[:, 1:] != ignore_index).sum())


@dataclass
class AccumulatedStep:
    loss: float  # mean token loss over the accumulated batch (what to log)
    num_tokens: int  # trained tokens in it (0: nothing was trained, gradients are zero)


SumLossFn = Callable[[Mapping[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
# One micro-batch: forward, then backward of `sum_loss / denominator` into `.grad`; returns the
# detached sum loss. Eager (`eager_micro_step`) or replayed from a CUDA graph (ftcore.training.cuda_graphs).
MicroStep = Callable[[Mapping[str, torch.Tensor], int], torch.Tensor]


def eager_micro_step(sum_loss_fn: SumLossFn) -> MicroStep:
    """The plain micro-step: `sum_loss_fn(batch)` returns (sum of token losses, trained tokens)."""

    def run(batch: Mapping[str, torch.Tensor], denominator: int) -> torch.Tensor:
        batch_loss, _ = sum_loss_fn(batch)
        (batch_loss / denominator).backward()
        return batch_loss.detach()

    return run


def accumulate_gradients(
    micro_batches: Sequence[Mapping[str, torch.Tensor]],
    micro_step: MicroStep,
    *,
    total_tokens: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> AccumulatedStep:
    """Backpropagate every micro-batch with the loss divided by the accumulated trained-token count.

    `micro_step` is e.g. `eager_micro_step(sum_loss_fn)`, with `sum_loss_fn` a closure over the model
    and `ftcore.modules.loss.cross_entropy_sum`. Each batch needs `labels` (B, T). With several ranks
    pass `total_tokens` (the all-reduced global count) and let the data-parallel wrapper SUM, not
    average, the gradients (FSDP2: `set_gradient_divide_factor(1)`), so the step equals one global batch.
    Gradients are added to `.grad`; the caller zeroes them before and steps the optimizer after.
    """
    if total_tokens is None:
        total_tokens = sum(count_trained_tokens(batch["labels"], ignore_index) for batch in micro_batches)
    # A batch with nothing to train (every label masked) gives a 0 loss and zero gradients, not NaN.
    denominator = max(total_tokens, 1)
    loss_sum = 0.0
    for batch in micro_batches:
        loss_sum += float(micro_step(batch, denominator))
    return AccumulatedStep(loss=loss_sum / denominator, num_tokens=total_tokens)
