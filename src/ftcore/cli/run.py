"""`ftcore run`: validate, then call the recipe's `recipe_main(cfg)` here or on every torchrun rank."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import DictConfig

from ftcore.cli.lifetime import run_launcher
from ftcore.cli.recipes import import_recipe, resolve_recipe, validate_for_recipe
from ftcore.config import apply_overrides, load_config, resolve_config_path

# torchrun flags `ftcore run` forwards to `python -m torch.distributed.run` (value-taking ones).
TORCHRUN_FLAGS = (
    "nproc_per_node", "nnodes", "node_rank", "rdzv_backend", "rdzv_endpoint", "rdzv_id", "rdzv_conf",
    "master_addr", "master_port", "max_restarts",
)  # fmt: skip


def add_torchrun_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("torchrun flags (any of them launches through torch.distributed.run)")
    for flag in TORCHRUN_FLAGS:
        spellings = dict.fromkeys([f"--{flag}", f"--{flag.replace('_', '-')}"])  # torchrun takes both
        group.add_argument(*spellings, dest=flag, metavar=flag.upper())
    group.add_argument("--standalone", action="store_true", help="single-node rendezvous on a free port")


def torchrun_args(args: argparse.Namespace) -> list[str]:
    flags = [f"--{f}={getattr(args, f)}" for f in TORCHRUN_FLAGS if getattr(args, f) is not None]
    return flags + (["--standalone"] if args.standalone else [])


def load_validated(recipe: str, config: str, overrides: list[str]) -> tuple[Path, DictConfig]:
    """Everything that can fail on a typo, before the recipe module is imported."""
    recipe_path = resolve_recipe(recipe)
    source = str(resolve_config_path(config))
    cfg = apply_overrides(load_config(config), overrides, source=source)
    validate_for_recipe(cfg, recipe_path, source)
    return recipe_path, cfg


def run_in_process(recipe: str, config: str, overrides: list[str]) -> int:
    recipe_path, cfg = load_validated(recipe, config, overrides)
    import_recipe(recipe_path).recipe_main(cfg)
    return 0


def cmd_run(args: argparse.Namespace, overrides: list[str]) -> int:
    launcher = torchrun_args(args)
    if not launcher:
        return run_in_process(args.recipe, args.config, overrides)
    # Fail fast here, once, rather than on every rank; ranks get absolute paths so any cwd works.
    recipe_path, _ = load_validated(args.recipe, args.config, overrides)
    config_path = resolve_config_path(args.config).resolve()
    command = [
        sys.executable, "-m", "torch.distributed.run", *launcher,
        "-m", "ftcore.cli.launch", str(recipe_path), "--config", str(config_path), *overrides,
    ]  # fmt: skip
    print("ftcore run: launching python " + " ".join(command[1:]), file=sys.stderr, flush=True)
    return run_launcher(command)
