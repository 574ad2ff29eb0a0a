"""The training loop every fine-tuning recipe runs: accumulate, step, log, evaluate, checkpoint.

The numerics live in `ftcore.training` (loss normalised over the whole accumulated batch, the
non-finite guard, early stopping); this loop only orders them. Across ranks the trained-token count
is all-reduced first, so every rank divides by the global count and the data-parallel wrapper sums
gradients (FSDP2 with a gradient divide factor of 1): one step equals one global batch.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ftcore.training import EarlyStopping, ProgressBar, TrainingProgress, accumulate_gradients, check_finite
from ftcore.training.accumulation import MicroStep, count_trained_tokens, eager_micro_step

LossFn = Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LoopSettings:
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    clip_grad_norm: float | None = None
    log_every_n_steps: int = 1
    eval_every_n_steps: int | None = None
    save_every_n_steps: int | None = None
    early_stopping_patience: int | None = None

    def __post_init__(self) -> None:
        """Config errors before any heavy work: counts are positive; `null` disables an optional one."""
        for key in ("epochs", "batch_size", "gradient_accumulation_steps", "log_every_n_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key `{key}` must be >= 1, got {getattr(self, key)}")
        for key in ("max_steps", "eval_every_n_steps", "save_every_n_steps", "early_stopping_patience"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"config key `{key}` must be >= 1 or null (off), got {value}")

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps the run takes: whole accumulated steps per epoch, times epochs, capped by max_steps."""
        steps = batches_per_epoch // self.gradient_accumulation_steps * self.epochs
        return min(steps, self.max_steps) if self.max_steps is not None else steps


def _all_reduce_sum(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor)


def _clip(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else math.inf)
    # Under FSDP2 the norm is a DTensor; its full value is the global norm over all shards.
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


class TrainLoop:
    def __init__(
        self,
        model,
        optimizer,
        scheduler,
        loader,
        sampler,
        loss_fn: LossFn,
        settings: LoopSettings,
        logger,
        save_checkpoint: Callable[[str], None],
        evaluate: Callable[[], dict] | None = None,
        device: torch.device | None = None,
        is_main: bool = True,
        seed: int = 0,
        micro_step: MicroStep | None = None,
        count_units: Callable[[Mapping[str, torch.Tensor]], int] | None = None,
        loss_metrics: Callable[[], dict] | None = None,
    ):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        # What the loss is averaged over (None: trained tokens; DPO: pairs), and the loss's own step metrics.
        self.count_units, self.loss_metrics = count_units, loss_metrics
        self.loader, self.sampler, self.loss_fn = loader, sampler, loss_fn
        # How one micro-batch runs: eager, or replayed from a CUDA graph (`cuda_graphs`).
        self.micro_step = micro_step or eager_micro_step(lambda batch: self.loss_fn(self.model, batch))
        self.settings, self.logger, self.is_main = settings, logger, is_main
        self.save_checkpoint, self.evaluate = save_checkpoint, evaluate
        self.device = device or torch.device("cpu")
        self.progress = TrainingProgress(step=0, epoch=0, batches_in_epoch=0, sampler_seed=seed)
        self.early_stopping = EarlyStopping(patience=settings.early_stopping_patience or sys.maxsize)
        self.stopped_early = False
        self.last_eval_step = -1
        self._trainable = [p for p in model.parameters() if p.requires_grad]

    @property
    def total_steps(self) -> int:
        return self.settings.total_steps(len(self.loader))

    def state_dict(self) -> dict:
        return {"early_stopping": self.early_stopping.state_dict(), "stopped_early": self.stopped_early}

    def load_state_dict(self, progress: TrainingProgress) -> None:
        self.progress = progress
        self.early_stopping.load_state_dict(progress.extra["early_stopping"])
        self.stopped_early = progress.extra["stopped_early"]

    def run(self) -> None:
        s, p = self.settings, self.progress
        bar = ProgressBar(self.total_steps, initial_step=p.step, disable=not self.is_main)
        while p.epoch < s.epochs and not self._finished():
            self.sampler.set_epoch(p.epoch)
            self.sampler.skip_first(p.batches_in_epoch * self.loader.batch_size)
            batches = iter(self.loader)
            while not self._finished() and not self._epoch_exhausted():
                metrics = self._optimizer_step(batches)
                metrics["tokens_per_second"] = bar.update(
                    metrics["loss"], metrics["lr"], metrics["num_tokens"]
                )
                self._after_step(metrics)
            if self._epoch_exhausted():
                p.epoch, p.batches_in_epoch = p.epoch + 1, 0
                self.save_checkpoint(f"epoch_{p.epoch}")
        bar.close()

    def _finished(self) -> bool:
        max_steps = self.settings.max_steps
        return self.stopped_early or (max_steps is not None and self.progress.step >= max_steps)

    def _epoch_exhausted(self) -> bool:
        return self.progress.batches_in_epoch + self.settings.gradient_accumulation_steps > len(self.loader)

    def _optimizer_step(self, batches: Iterator[dict]) -> dict:
        s, p = self.settings, self.progress
        micro = [next(batches) for _ in range(s.gradient_accumulation_steps)]
        local_tokens = sum(count_trained_tokens(b["labels"]) for b in micro)
        total_tokens = int(_all_reduce_sum(float(local_tokens), self.device))
        units = total_tokens
        if self.count_units is not None:
            units = int(_all_reduce_sum(float(sum(self.count_units(b) for b in micro)), self.device))
        step = accumulate_gradients(micro, self.micro_step, total_tokens=units)
        # Each rank's loss is its share of the global mean; their sum is the global mean.
        loss = _all_reduce_sum(step.loss, self.device)
        check_finite(loss, p.step + 1)
        grad_norm = self._grad_norm()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        p.step += 1
        p.batches_in_epoch += s.gradient_accumulation_steps
        # All ranks' tokens, as the loss is all ranks' mean: tokens_per_second is the run's, not one GPU's.
        metrics = {
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "num_tokens": total_tokens,
            "epoch": p.epoch,
        }
        return metrics | (self.loss_metrics() if self.loss_metrics else {})

    def _grad_norm(self) -> float:
        """The global gradient norm before clipping (gradients are clipped to `clip_grad_norm` when set).

        An optimizer that consumes gradients inside the backward (optimizer_in_backward, which has
        already stepped and freed them; CPU offload) measured the norm as they arrived; clipping is
        refused for those when they are built, and their `step()` does what is left (or nothing).
        """
        if hasattr(self.optimizer, "take_grad_norm"):
            return self.optimizer.take_grad_norm()
        return _clip(self._trainable, self.settings.clip_grad_norm)

    def _after_step(self, metrics: dict) -> None:
        s, step = self.settings, self.progress.step
        if step % s.log_every_n_steps == 0 or step == 1:
            self._log(metrics)
        if s.eval_every_n_steps and self.evaluate and step % s.eval_every_n_steps == 0:
            self.run_evaluation()
        if s.save_every_n_steps and step % s.save_every_n_steps == 0 and not self.stopped_early:
            self.save_checkpoint(f"step_{step:06d}")

    def _log(self, metrics: dict) -> None:
        if self.device.type == "cuda":
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.logger.log(metrics, step=self.progress.step)

    def run_evaluation(self) -> None:
        """Evaluate; keep the best checkpoint by `val_loss`; stop after `patience` evaluations without gain."""
        if self.evaluate is None:  # callers check `self.evaluate` first
            raise ValueError("run_evaluation needs an `evaluate` function: TrainLoop(..., evaluate=...)")
        metrics = self.evaluate()
        self.last_eval_step = self.progress.step
        self._log(dict(metrics))
        if "val_loss" not in metrics:
            return
        if self.early_stopping.update(metrics["val_loss"], self.progress.step):
            self.save_checkpoint("best")
        elif self.early_stopping.should_stop:
            self.stopped_early = True
            self.logger.log({"early_stopped_at_step": self.progress.step}, step=self.progress.step)
