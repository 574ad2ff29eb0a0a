"""Next-token cross-entropy returning (sum of token losses, number of trained tokens).

Returning the sum and the count, rather than a mean, lets the training step divide by the number of
trained tokens of the whole accumulated batch (see ftcore.training.accumulation), which is what makes
gradient accumulation equal to one big batch. Labels are NOT shifted by the data pipeline: position t
predicts label t+1, and the shift happens here. Positions labelled `ignore_index` are not trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _check_shapes(scores: torch.Tensor, labels: torch.Tensor, what: str) -> None:
    if scores.dim() != 3 or labels.dim() != 2 or scores.shape[:2] != labels.shape:
        raise ValueError(
            f"cross-entropy expects {what} (B, T, ...) and labels (B, T); got {tuple(scores.shape)} "
            f"and {tuple(labels.shape)}"
        )


def cross_entropy_sum(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, T, V), unshifted labels (B, T) -> (fp32 sum of losses, int64 count of trained tokens)."""
    _check_shapes(logits, labels, "logits")
    shifted_logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()  # (B*(T-1), V)
    shifted_labels = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    loss_sum = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=ignore_index, reduction="sum")
    return loss_sum, (shifted_labels != ignore_index).sum()


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    logits = (hidden @ weight.T).float()  # (chunk, V), upcast per chunk only
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


def chunked_cross_entropy_sum(
    hidden: torch.Tensor,
    output_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as cross_entropy_sum(hidden @ output_weight.T, labels) without all logits at once.

    hidden (B, T, D) final-normed states, output_weight (V, D), labels (B, T) unshifted. The tokens are
    split into chunks of `chunk_size`; each chunk's logits (chunk, V) are computed in fp32 and, under
    autograd, recomputed in backward (activation checkpointing) so they are never all alive together.
    Positions with no trained label are skipped before the projection.
    """
    _check_shapes(hidden, labels, "hidden states")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    shifted_hidden = hidden[:, :-1].reshape(-1, hidden.size(-1))  # (B*(T-1), D)
    shifted_labels = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    trained = shifted_labels != ignore_index
    shifted_hidden, shifted_labels = shifted_hidden[trained], shifted_labels[trained]  # (N, D), (N,)
    loss_sum = hidden.new_zeros((), dtype=torch.float32)
    if shifted_labels.numel() == 0:
        # Keep the graph connected so backward() works on a batch with nothing to train.
        return loss_sum + 0.0 * hidden.sum() + 0.0 * output_weight.sum(), trained.sum()
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or output_weight.requires_grad)
    for start in range(0, shifted_labels.numel(), chunk_size):
        args = (
            shifted_hidden[start : start + chunk_size],
            output_weight,
            shifted_labels[start : start + chunk_size],
            ignore_index,
        )
        if needs_grad:
            loss_sum = loss_sum + checkpoint(_chunk_loss_sum, *args, use_reentrant=False)
        else:
            loss_sum = loss_sum + _chunk_loss_sum(*args)
    return loss_sum, trained.sum()
