"""Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290) on LoRA adapters.

For a prompt x with a chosen answer y_w and a rejected one y_l, and h = (log pi(y_w|x) - log ref(y_w|x))
- (log pi(y_l|x) - log ref(y_l|x)), the loss per pair is -log sigmoid(beta h). With `label_smoothing`
eps (the "conservative DPO" of Mitchell 2023, for noisy preference labels) it is
-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h). The reference model is the frozen base
itself: the same model with its LoRA adapters switched off (`disable_adapters`), so DPO costs no
second copy of the weights. At the start of training (B = 0) the policy is the reference and every
pair's loss is log 2.

The implicit rewards the paper defines, beta (log pi(y|x) - log ref(y|x)), are logged per step as
rewards_chosen, rewards_rejected, rewards_margin and rewards_accuracy (the share of pairs whose chosen
answer has the larger reward); evaluation logs the same with a `val_` prefix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ftcore.modules.lora import LoRALinear, disable_adapters, lora_modules
from ftcore.modules.loss import logits_sequence_log_probs, sequence_log_probs

if TYPE_CHECKING:
    from ftcore.models.transformer import TransformerDecoder

_STATS = ("rewards_chosen", "rewards_rejected", "rewards_accuracy", "pairs")


class DPOLoss:
    """loss(model, batch) -> (sum of the pairs' DPO losses, number of pairs), for `preference_collate`
    batches (rows 0..B-1 chosen, B..2B-1 rejected). `pairs = True` tells the run to batch preference
    pairs and to average the loss over pairs, not tokens."""

    pairs = True

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, chunk_size: int = 1024):
        if beta <= 0:
            raise ValueError(f"loss.beta must be > 0 (the paper uses 0.1 to 0.5), got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"loss.label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if chunk_size < 1:
            raise ValueError(f"loss.chunk_size must be >= 1, got {chunk_size}")
        self.beta, self.label_smoothing, self.chunk_size = beta, label_smoothing, chunk_size
        self._sums: torch.Tensor | None = None  # running (chosen reward, rejected reward, correct, pairs)

    def __call__(self, model: TransformerDecoder, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if not any(True for _ in lora_modules(model)):
            raise ValueError(
                "loss DPOLoss needs a model with LoRA adapters: its reference model is the base with the "
                "adapters switched off. Use the lora_dpo recipe with a lora_* model builder"
            )
        with torch.no_grad(), disable_adapters(model):
            reference = self._log_probs(model, batch)
        _reshard_if_sharded(model)  # a no-grad forward leaves FSDP units gathered (see reshard_all)
        policy = self._log_probs(model, batch)
        chosen, rejected = (policy - reference).chunk(2)
        logits = self.beta * (chosen - rejected)
        losses = -(1 - self.label_smoothing) * F.logsigmoid(logits) - self.label_smoothing * F.logsigmoid(
            -logits
        )
        self._record(self.beta * chosen.detach(), self.beta * rejected.detach())
        return losses.sum(), torch.tensor(losses.numel(), device=losses.device)

    def _log_probs(self, model: TransformerDecoder, batch: dict) -> torch.Tensor:
        hidden = model.hidden(batch["tokens"])
        if isinstance(model.output, LoRALinear):  # an adapted output projection has no one weight to chunk
            return logits_sequence_log_probs(model.output(hidden), batch["labels"])
        return sequence_log_probs(hidden, model.output_weight, batch["labels"], self.chunk_size)

    @staticmethod
    def count_units(batch: dict) -> int:
        """What the loss is averaged over: the pairs of a micro-batch."""
        return int(batch["tokens"].shape[0]) // 2

    def _record(self, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> None:
        sums = torch.stack(
            [
                chosen_rewards.sum(),
                rejected_rewards.sum(),
                (chosen_rewards > rejected_rewards).float().sum(),
                torch.tensor(float(chosen_rewards.numel()), device=chosen_rewards.device),
            ]
        ).float()
        self._sums = sums if self._sums is None else self._sums + sums

    def pop_metrics(self) -> dict[str, float]:
        """The mean rewards and accuracy over the pairs seen since the last call (all ranks), then reset."""
        if self._sums is None:
            return {}
        sums, self._sums = self._sums, None
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        stats = dict(zip(_STATS, sums.tolist()))
        pairs = max(stats.pop("pairs"), 1.0)
        means = {name: value / pairs for name, value in stats.items()}
        means["rewards_margin"] = means["rewards_chosen"] - means["rewards_rejected"]
        return means


def _reshard_if_sharded(model: torch.nn.Module) -> None:
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        from ftcore.distributed.fsdp import reshard_all

        reshard_all(model)
