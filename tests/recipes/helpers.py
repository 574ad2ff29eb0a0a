"""Helpers for end-to-end recipe tests: build a config from a built-in one and run a recipe in-process."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from ftcore.config import apply_overrides, load_config
from ftcore.paths import RECIPES_DIR


def load_recipe_module(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demo_config(config: str, output_dir: Path, *overrides: str):
    """A built-in demo config made small: fewer rows and steps, quiet logging, output in tmp."""
    small = [
        f"output_dir={output_dir}",
        "dataset.source.num_rows=256",
        "dataset_val.source.num_rows=64",
        "evaluators.0.max_rows=16",
        "batch_size=8",
        "epochs=1",
        "log_every_n_steps=1",
        "save_every_n_steps=null",
        "eval_every_n_steps=null",
        "plot_loss_curve=false",
    ]
    return apply_overrides(load_config(config), small + list(overrides))


def run(recipe: str, cfg) -> None:
    load_recipe_module(recipe).recipe_main(cfg)


def trained_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The trained tensors a checkpoint folder holds: the LoRA adapter, or the whole saved model."""
    adapter = folder / "trainable.safetensors"
    return load_file(str(adapter if adapter.is_file() else folder / "model" / "ftcore_model.safetensors"))


def ftcore_run_command(*args: str) -> list[str]:
    """`ftcore run ARGS...` as a user types it, with this test's Python."""
    return [sys.executable, "-m", "ftcore.cli.main", "run", *args]
