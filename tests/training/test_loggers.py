"""Every metric logger writes what it was given, read back with the format's own reader."""

from __future__ import annotations

import io
import json
import math
import time

import pytest
import torch
from omegaconf import OmegaConf

from ftcore.training import (
    JSONLLogger,
    MultiLogger,
    StdoutLogger,
    TensorBoardLogger,
    WandBLogger,
    build_metric_logger,
    plot_loss_curve,
)


def test_jsonl_logger_appends_plain_values(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    logger = JSONLLogger(path)
    logger.log({"loss": torch.tensor(1.5), "lr": 1e-4}, step=1)
    logger.log({"loss": math.nan}, step=2)
    logger.close()
    JSONLLogger(path).log({"val_loss": 0.5}, step=3)  # a resumed run appends
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records == [
        {"step": 1, "loss": 1.5, "lr": 1e-4},
        {"step": 2, "loss": "nan"},
        {"step": 3, "val_loss": 0.5},
    ]


def test_stdout_logger_formats_one_line():
    stream = io.StringIO()
    StdoutLogger(stream).log({"loss": 0.123456789, "tokens": 7}, step=4)
    assert stream.getvalue() == "step 4: loss=0.123457 tokens=7\n"


def test_tensorboard_logger_round_trip(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    logger = TensorBoardLogger(tmp_path)
    for step in range(3):
        logger.log({"loss": 1.0 / (step + 1), "note": "skipped, not a number"}, step=step)
    logger.close()
    reader = event_accumulator.EventAccumulator(str(tmp_path))
    reader.Reload()
    assert reader.Tags()["scalars"] == ["loss"]
    assert [(e.step, round(e.value, 6)) for e in reader.Scalars("loss")] == [
        (0, 1.0),
        (1, 0.5),
        (2, 0.333333),
    ]


def test_wandb_logger_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandBLogger(project="ftcore-test", mode="offline", dir=str(tmp_path), config={"lr": 0.1})
    logger.log({"loss": 2.5}, step=1)
    logger.log({"loss": 1.25}, step=2)
    logger.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # The offline run file holds protobuf history records: key "loss" with JSON-encoded values.
    # wandb's service process may still be flushing the file when finish() returns.
    for _ in range(100):
        data = next(runs[0].glob("*.wandb")).read_bytes()
        if b"1.25" in data:
            break
        time.sleep(0.1)
    assert b"loss" in data and b"2.5" in data and b"1.25" in data


def test_build_metric_logger_from_config_list(tmp_path):
    cfg = OmegaConf.create(
        {
            "metric_logger": [
                {"_component_": "ftcore.training.JSONLLogger", "path": str(tmp_path / "m.jsonl")},
                {"_component_": "ftcore.training.StdoutLogger"},
            ]
        }
    )
    logger = build_metric_logger(cfg.metric_logger)
    assert isinstance(logger, MultiLogger) and len(logger.loggers) == 2
    logger.log({"loss": 3.0}, step=1)
    logger.close()
    assert json.loads((tmp_path / "m.jsonl").read_text()) == {"step": 1, "loss": 3.0}
    single = build_metric_logger({"_component_": "ftcore.training.StdoutLogger"})
    assert isinstance(single, StdoutLogger)


def test_plot_loss_curve_writes_png(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    logger = JSONLLogger(jsonl)
    for step in range(1, 21):
        logger.log({"loss": 3.0 / step}, step=step)
        if step % 5 == 0:
            logger.log({"val_loss": 3.5 / step}, step=step)
    logger.close()
    png = plot_loss_curve(jsonl, tmp_path / "out" / "loss.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"step": 1, "lr": 0.1}\n')
    with pytest.raises(ValueError, match="no `loss`"):
        plot_loss_curve(empty, tmp_path / "x.png")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"step": 1, "loss": 1}\n{oops\n')
    with pytest.raises(ValueError, match="line 2"):
        plot_loss_curve(broken, tmp_path / "x.png")
