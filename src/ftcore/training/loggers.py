"""Metric loggers: each has `log(metrics: dict, step: int)` and `close()`.

Config: `metric_logger: {_component_: ftcore.training.JSONLLogger, path: ${output_dir}/metrics.jsonl}`,
or a list of such nodes (built into a MultiLogger by `build_metric_logger`). Key names the recipes use:
`loss` (train), `val_loss`, `lr`, `grad_norm`, `tokens_per_second`, `peak_memory_gib`.
Only rank 0 should log; the recipe builds no logger (or a StdoutLogger) on the others.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO, cast


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars -> Python numbers, so every logger sees plain values."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def _format(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


class MetricLogger(Protocol):
    """What the training loop logs to (every logger here)."""

    def log(self, metrics: Mapping[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


class StdoutLogger:
    def __init__(self, stream: TextIO | None = None):
        self.stream = stream

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        items = " ".join(f"{k}={_format(_plain(v))}" for k, v in metrics.items())
        print(f"step {step}: {items}", file=self.stream or sys.stdout, flush=True)

    def close(self) -> None:
        pass


class JSONLLogger:
    """One JSON object per line: {"step": N, **metrics}. Appends, so a resumed run continues the file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        record: dict[str, Any] = {"step": int(step)}
        for key, value in metrics.items():
            value = _plain(value)
            # JSON has no NaN/Inf; write them as strings rather than produce an unreadable line.
            record[key] = str(value) if isinstance(value, float) and not math.isfinite(value) else value
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def drop_records_after(path: str | os.PathLike, step: int) -> None:
    """Remove the records of steps after `step` from a JSONL metrics file, in place.

    A resumed run repeats the steps since its checkpoint; without this they would be logged twice and
    the loss curve would double back. The file is rewritten through a second handle and truncated, so
    a JSONLLogger that already holds it open (append mode) keeps writing at the new end.
    """
    path = Path(path)
    if not path.is_file():
        return
    with open(path, "r+", encoding="utf-8") as handle:
        kept = [line for line in handle if line.strip() and json.loads(line).get("step", 0) <= step]
        handle.seek(0)
        handle.writelines(kept)
        handle.truncate()


class WandBLogger:
    """Weights & Biases; `mode="offline"` (the default) writes runs under `dir` for a later `wandb sync`."""

    def __init__(
        self,
        project: str,
        mode: str = "offline",
        name: str | None = None,
        dir: str | None = None,
        config: Mapping[str, Any] | None = None,
        **init_kwargs: Any,
    ):
        try:
            import wandb
        except ImportError as error:
            raise ValueError("WandBLogger needs wandb: pip install wandb (or ftcore[logging])") from error
        if dir is not None:
            Path(dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project,
            mode=cast(Any, mode),
            name=name,
            dir=dir,
            config=dict(config or {}),
            **init_kwargs,
        )

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        self.run.log({k: _plain(v) for k, v in metrics.items()}, step=int(step))

    def close(self) -> None:
        self.run.finish()


class TensorBoardLogger:
    def __init__(self, log_dir: str | os.PathLike):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        for key, value in metrics.items():
            value = _plain(value)
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, global_step=int(step))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MultiLogger:
    """Fans every call out to several loggers."""

    def __init__(self, loggers: Sequence[Any]):
        self.loggers = list(loggers)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def build_metric_logger(node: Any) -> Any:
    """A logger from a config node: None -> StdoutLogger, a `_component_` mapping, or a list of them."""
    from ftcore.config.instantiate import instantiate, to_plain

    plain = to_plain(node) if node is not None else None
    if plain is None:
        return StdoutLogger()
    if isinstance(plain, list):
        return MultiLogger([instantiate(item) for item in plain])
    return instantiate(plain)
