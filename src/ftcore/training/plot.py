"""The loss-curve PNG written next to the final checkpoint."""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: str | Path) -> list[dict]:
    records = []
    for line_number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {line_number}: not JSON ({error.msg})") from error
    return records


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], float(r[key])) for r in records if key in r and "step" in r]
    return [s for s, _ in points], [v for _, v in points]


def plot_loss_curve(
    jsonl_path: str | Path, png_path: str | Path, train_key: str = "loss", val_key: str = "val_loss"
) -> Path:
    """Plot train loss (and validation loss where logged) against step from a JSONLLogger file."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    records = read_jsonl(jsonl_path)
    train_steps, train = _series(records, train_key)
    if not train:
        raise ValueError(f"{jsonl_path} has no `{train_key}` values to plot")
    val_steps, val = _series(records, val_key)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(train_steps, train, label="train loss", linewidth=1)
    if val:
        ax.plot(val_steps, val, "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path
