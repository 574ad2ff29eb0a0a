"""The resumable training state: optimizer, scheduler, progress, data position and every RNG.

Saved next to the weights as `training_state.pt` (+ a small `training_state.json` summary). Restoring
all of it makes a resumed run bit-identical to one that never stopped, on CPU: the optimizer moments,
the lr schedule's step, the position in the epoch (batches already consumed), the sampler seed that
fixes each epoch's shuffle, and the torch/CUDA/Python/NumPy generators that drive dropout and shuffling.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch

from ftcore.training.checkpoint_io import STATE_FILE, STATE_SUMMARY, atomic_torch_save, atomic_write_json

log = logging.getLogger(__name__)


class HasStateDict(Protocol):
    """What a training state saves and restores: an optimizer, or a stand-in whose state is kept elsewhere
    (ftcore.runner.sharded.OptimizerStateInDCP)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any], /) -> None: ...


@dataclass
class TrainingProgress:
    step: int  # optimizer steps taken so far
    epoch: int  # current epoch (0-based)
    batches_in_epoch: int  # batches of `epoch` already consumed; resume skips this many
    sampler_seed: int  # the seed the data sampler shuffles with (epoch e uses sampler_seed + e)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. early stopping state


def capture_rng_state() -> dict[str, Any]:
    # legacy=True (the default): the MT19937 tuple, never the dict form
    numpy_state = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        # NumPy's MT19937 state as plain values, so the file loads with weights_only=True.
        "numpy": {
            "name": numpy_state[0],
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )


def save_training_state(
    checkpoint_dir: str | Path,
    *,
    optimizer: HasStateDict,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    progress: TrainingProgress,
) -> Path:
    """Write training_state.pt and training_state.json into checkpoint_dir (each atomically)."""
    checkpoint_dir = Path(checkpoint_dir)
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "progress": asdict(progress),
        "rng": capture_rng_state(),
    }
    path = atomic_torch_save(state, checkpoint_dir / STATE_FILE)
    # The summary is written last: find_latest_checkpoint only trusts folders that have it.
    atomic_write_json({"step": progress.step, "epoch": progress.epoch}, checkpoint_dir / STATE_SUMMARY)
    return path


def load_training_state(
    checkpoint_dir: str | Path,
    *,
    optimizer: HasStateDict,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    restore_rng: bool = True,
) -> TrainingProgress:
    """Restore optimizer, scheduler and (by default) RNG states in place; return the saved progress."""
    path = Path(checkpoint_dir) / STATE_FILE
    if not path.is_file():
        raise ValueError(
            f"no {STATE_FILE} in {checkpoint_dir}: resume needs a checkpoint saved by a training run "
            "(pick a step_*/epoch_* folder, or drop resume_from_checkpoint)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    check_optimizer_state_kind(state["optimizer"], optimizer, checkpoint_dir)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        if state["scheduler"] is None:
            raise ValueError(f"{path} was saved without an lr scheduler but this run has one")
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        restore_rng_state(state["rng"])
    return TrainingProgress(**state["progress"])


def follow_this_runs_schedule(
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    checkpoint_dir,
    base_lrs: Sequence[float | torch.Tensor],
    warn: bool = True,
) -> None:
    """After a resume, set the next step's lr from this run's schedule and lr (`base_lrs`, the
    scheduler's before the checkpoint was loaded) at the restored step.

    The optimizer state carries the lr the saved run's schedule gave its last step, and the scheduler
    state the saved run's base lr. A resumed run whose schedule or lr differs (a larger max_steps,
    another warmup, a new optimizer.lr) would train one step at the old lr (0 at the end of a finished
    cosine) and keep the old base. Unchanged, the same expression gives the same float, so an exact
    resume stays exact. Only LambdaLR (ftcore's schedules) is re-derived."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return
    step = scheduler.last_epoch
    lrs = [base * factor(step) for factor, base in zip(scheduler.lr_lambdas, base_lrs, strict=True)]
    groups = scheduler.optimizer.param_groups
    if warn and any(group["lr"] != lr for group, lr in zip(groups, lrs, strict=True)):
        log.warning(
            "resuming from %s at step %d with a different lr or schedule: the next lr is %.6g (this run's), "
            "not %.6g (the checkpoint's)", checkpoint_dir, step, lrs[0], groups[0]["lr"],
        )  # fmt: skip
    scheduler.base_lrs[:] = base_lrs
    for group, base, lr in zip(groups, base_lrs, lrs, strict=True):
        group["initial_lr"], group["lr"] = base, lr
    scheduler._last_lr = lrs  # what get_last_lr() reports (torch's own attribute)


def check_optimizer_state_kind(saved: dict, optimizer, checkpoint_dir) -> None:
    """A checkpoint saved with `optimizer_in_backward: true` holds one state per parameter
    (`per_parameter`); an ordinary optimizer cannot load it. (The other way round, the per-parameter
    facade itself says so.)"""
    from ftcore.training.optim_in_backward import OptimizerInBackward

    if (
        isinstance(saved, dict)
        and "per_parameter" in saved
        and not isinstance(optimizer, OptimizerInBackward)
    ):
        raise ValueError(
            f"{checkpoint_dir} was saved with optimizer_in_backward: true (one optimizer state per "
            "parameter); resume it with optimizer_in_backward=true, or start without resume_from_checkpoint"
        )
