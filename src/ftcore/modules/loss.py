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


def _shifted(scores: torch.Tensor, labels: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (B, T, X), unshifted labels (B, T) -> the rows of positions 0..T-2 (B*(T-1), X) and the
    labels they predict (B*(T-1),)."""
    _check_shapes(scores, labels, what)
    return scores[:, :-1].reshape(-1, scores.size(-1)), labels[:, 1:].reshape(-1)


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")


def _per_chunk(fn, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int,
               ignore_index: int, needs_grad: bool):  # fmt: skip
    """fn(hidden rows, weight, labels, ignore_index) of each `chunk_size` rows in turn; under autograd
    checkpointed, so each chunk's logits are recomputed in the backward rather than kept."""
    for start in range(0, labels.numel(), chunk_size):
        args = (hidden[start : start + chunk_size], weight, labels[start : start + chunk_size], ignore_index)
        # nothing random in a chunk: no RNG state to stash and replay
        yield (
            checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False) if needs_grad else fn(*args)
        )


def cross_entropy_sum(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, T, V), unshifted labels (B, T) -> (fp32 sum of losses, int64 count of trained tokens)."""
    shifted_logits, shifted_labels = _shifted(logits, labels, "logits")  # (B*(T-1), V), (B*(T-1),)
    loss_sum = F.cross_entropy(
        shifted_logits.float(), shifted_labels, ignore_index=ignore_index, reduction="sum"
    )
    return loss_sum, (shifted_labels != ignore_index).sum()


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    logits = (hidden @ weight.T).float()  # (chunk, V), upcast per chunk only
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


class _FrozenWeightLinearCrossEntropy(torch.autograd.Function):
    """Sum of token losses of `hidden @ weight.T`, its input gradient computed during the forward.

    For a frozen output weight (LoRA, QLoRA) the only gradient is the one to `hidden`, and the loss is
    the graph's last node, so the gradient of each chunk is known as soon as its logits are: softmax
    minus one-hot, projected back through the weight. Computing it then saves the backward's recompute
    of the logits (a third 128K-vocabulary matmul) and the memory passes of autograd's log-softmax;
    what stays alive is `grad_hidden` (N, D), never the logits. Liger Kernel's fused linear
    cross-entropy works the same way. The backward only scales `grad_hidden` by the incoming gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size: int, ignore_index: int):
        loss_sum = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            chunk_loss, chunk_grad = _chunk_loss_and_input_grad(
                hidden[rows], weight, labels[rows], ignore_index
            )
            loss_sum += chunk_loss
            grad_hidden[rows] = chunk_grad
        ctx.save_for_backward(grad_hidden)
        return loss_sum

    @staticmethod
    @torch.autograd.function.once_differentiable  # the saved gradient has no graph behind it
    def backward(ctx, grad_loss):
        (grad_hidden,) = ctx.saved_tensors
        # scaled in fp32: a bf16 scale would bias every gradient by its rounding (up to 2**-9)
        return (grad_hidden.float() * grad_loss).to(grad_hidden.dtype), None, None, None, None


def _chunk_loss_and_input_grad(hidden, weight, labels, ignore_index: int):
    """(sum of the chunk's token losses, d loss_sum / d hidden) with the logits upcast to fp32."""
    logits = (hidden @ weight.T).float()  # (chunk, V)
    trained = labels != ignore_index
    targets = torch.where(trained, labels, 0)[:, None]  # (chunk, 1); ignored rows score label 0, then x 0
    log_normalizer = torch.logsumexp(logits, dim=-1)
    losses = log_normalizer - logits.gather(1, targets).squeeze(1)
    probs = logits.sub_(log_normalizer[:, None]).exp_()  # softmax, in place of the logits
    probs.scatter_add_(1, targets, probs.new_full(targets.shape, -1.0))  # softmax - one-hot
    # where, not a product: a non-finite score at an ignored position must not reach the sum (NaN x 0)
    grad = torch.where(trained[:, None], probs.to(hidden.dtype) @ weight, 0.0)
    return torch.where(trained, losses, 0.0).sum(), grad


def chunked_cross_entropy_sum(
    hidden: torch.Tensor,
    output_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
    skip_ignored: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as cross_entropy_sum(hidden @ output_weight.T, labels) without all logits at once.

    hidden (B, T, D) final-normed states, output_weight (V, D), labels (B, T) unshifted. The tokens are
    split into chunks of `chunk_size`; each chunk's logits (chunk, V) are computed in fp32 and, under
    autograd, recomputed in backward (activation checkpointing) so they are never all alive together.
    Positions with no trained label are skipped before the projection; with `skip_ignored=False` they
    are projected and scored as zero instead, which keeps every shape independent of the labels (a
    CUDA graph cannot capture the data-dependent selection).
    """
    shifted_hidden, shifted_labels = _shifted(hidden, labels, "hidden states")  # (B*(T-1), D), (B*(T-1),)
    _check_chunk_size(chunk_size)
    trained = shifted_labels != ignore_index
    if skip_ignored:
        shifted_hidden, shifted_labels = shifted_hidden[trained], shifted_labels[trained]  # (N, D), (N,)
    loss_sum = hidden.new_zeros((), dtype=torch.float32)
    if shifted_labels.numel() == 0:
        # Keep the graph connected so backward() works on a batch with nothing to train.
        return loss_sum + 0.0 * hidden.sum() + 0.0 * output_weight.sum(), trained.sum()
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or output_weight.requires_grad)
    if needs_grad and not output_weight.requires_grad:  # LoRA / QLoRA: only the input gradient exists
        loss_sum = _FrozenWeightLinearCrossEntropy.apply(
            shifted_hidden, output_weight, shifted_labels, chunk_size, ignore_index
        )
        return loss_sum, trained.sum()
    chunks = _per_chunk(_chunk_loss_sum, shifted_hidden, output_weight, shifted_labels, chunk_size,
                        ignore_index, needs_grad)  # fmt: skip
    for chunk_loss in chunks:
        loss_sum = loss_sum + chunk_loss
    return loss_sum, trained.sum()


def logits_sequence_log_probs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """logits (B, T, V), unshifted labels (B, T) -> per sequence, the fp32 sum of log p(label): (B,)."""
    shifted_logits, shifted_labels = _shifted(logits, labels, "logits")
    losses = F.cross_entropy(
        shifted_logits.float(), shifted_labels, ignore_index=ignore_index, reduction="none"
    )
    return -losses.view(labels.shape[0], -1).sum(dim=1)


def _chunk_token_losses(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    logits = (hidden @ weight.T).float()  # (chunk, V)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")  # 0 where ignored


def sequence_log_probs(
    hidden: torch.Tensor,
    output_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Per sequence, the fp32 sum of log p(label) over its trained positions: (B,), for DPO.

    hidden (B, T, D) final-normed states, output_weight (V, D), labels (B, T) unshifted. As in
    `chunked_cross_entropy_sum`, `chunk_size` tokens are projected at a time and, under autograd, each
    chunk's logits are recomputed in the backward rather than kept."""
    shifted_hidden, shifted_labels = _shifted(hidden, labels, "hidden states")
    _check_chunk_size(chunk_size)
    batch, length = labels.shape
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or output_weight.requires_grad)
    losses = list(_per_chunk(_chunk_token_losses, shifted_hidden, output_weight, shifted_labels, chunk_size,
                             ignore_index, needs_grad))  # fmt: skip
    if not losses:  # sequences of one token: nothing is predicted
        return hidden.new_zeros(batch, dtype=torch.float32) + 0.0 * hidden.sum()
    return -torch.cat(losses).view(batch, length - 1).sum(dim=1)
