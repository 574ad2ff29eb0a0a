"""Early stopping on a validation metric (lower is better by default)."""

from __future__ import annotations

import math


class EarlyStopping:
    """Stop after `patience` evaluations in a row without improving on the best value by > min_delta."""

    def __init__(self, patience: int, min_delta: float = 0.0, mode: str = "min"):
        if patience < 1:
            raise ValueError(f"early stopping patience must be >= 1, got {patience}")
        if mode not in ("min", "max"):
            raise ValueError(f"early stopping mode must be 'min' or 'max', got {mode!r}")
        self.patience, self.min_delta, self.mode = patience, min_delta, mode
        self.best = math.inf if mode == "min" else -math.inf
        self.best_step: int | None = None
        self.bad_evaluations = 0

    def update(self, value: float, step: int) -> bool:
        """Record one evaluation; True when it is a new best (the caller then saves the best checkpoint)."""
        value = float(value)
        improved = (
            value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        )
        if improved:
            self.best, self.best_step, self.bad_evaluations = value, step, 0
        else:
            self.bad_evaluations += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.bad_evaluations >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad_evaluations": self.bad_evaluations}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step, self.bad_evaluations = (
            state["best"],
            state["best_step"],
            state["bad_evaluations"],
        )
