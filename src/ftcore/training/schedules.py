"""Learning-rate schedules as LambdaLR factories (stepped once per optimizer step).

Each multiplies the optimizer's lr by a factor: linear warmup from 0 over `num_warmup_steps`
(factor step / num_warmup_steps), then cosine, linear, or constant, never below `min_lr_ratio`.
These match transformers' get_{cosine,linear,constant}_schedule_with_warmup at min_lr_ratio=0.
"""

from __future__ import annotations

import logging
import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

log = logging.getLogger("ftcore")


def _check(num_warmup_steps: int, num_training_steps: int | None, min_lr_ratio: float) -> None:
    if num_warmup_steps < 0:
        raise ValueError(f"num_warmup_steps must be >= 0, got {num_warmup_steps}")
    if num_training_steps is not None and num_training_steps < num_warmup_steps:
        # A smoke test (`max_steps=3` on a config with 100 warmup steps) is a normal thing to run: warn.
        log.warning(
            "lr_scheduler: the run has %d steps, fewer than num_warmup_steps (%d), so the lr stays in warmup "
            "and peaks at %.0f%% of its set value (its last step); lower lr_scheduler.num_warmup_steps for a real run",
            num_training_steps, num_warmup_steps, 100 * max(num_training_steps - 1, 0) / num_warmup_steps,
        )  # fmt: skip
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")


def _warmup(step: int, num_warmup_steps: int) -> float | None:
    return step / max(1, num_warmup_steps) if step < num_warmup_steps else None


def cosine_with_warmup(
    optimizer: Optimizer, num_warmup_steps: int, num_training_steps: int, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Warmup, then half a cosine from 1 down to min_lr_ratio at num_training_steps."""
    _check(num_warmup_steps, num_training_steps, min_lr_ratio)

    def factor(step: int) -> float:
        warm = _warmup(step, num_warmup_steps)
        if warm is not None:
            return warm
        progress = min(1.0, (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def linear_with_warmup(
    optimizer: Optimizer, num_warmup_steps: int, num_training_steps: int, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Warmup, then a straight line from 1 down to min_lr_ratio at num_training_steps."""
    _check(num_warmup_steps, num_training_steps, min_lr_ratio)

    def factor(step: int) -> float:
        warm = _warmup(step, num_warmup_steps)
        if warm is not None:
            return warm
        remaining = max(0.0, (num_training_steps - step) / max(1, num_training_steps - num_warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * remaining

    return LambdaLR(optimizer, factor)


def constant_with_warmup(optimizer: Optimizer, num_warmup_steps: int = 0) -> LambdaLR:
    """Warmup, then the configured lr."""
    _check(num_warmup_steps, None, 0.0)

    def factor(step: int) -> float:
        warm = _warmup(step, num_warmup_steps)
        return 1.0 if warm is None else warm

    return LambdaLR(optimizer, factor)
