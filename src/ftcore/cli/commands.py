"""The small subcommands: ls, cp, cat, validate, download, data check."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ftcore import paths, registry
from ftcore.cli.recipes import resolve_recipe, validate_for_recipe
from ftcore.config import (
    ConfigError,
    apply_overrides,
    builtin_config_names,
    load_config,
    resolve_config_path,
    validate_config,
)
from ftcore.config.errors import did_you_mean
from ftcore.config.input_paths import missing_input_paths
from ftcore.config.instantiate import interpolation_error, to_plain
from ftcore.paths import shown_path


def cmd_ls(args: argparse.Namespace, overrides: list[str]) -> int:
    rows = []
    for entry in registry.RECIPES:
        rows += [(entry.name if i == 0 else "", cfg) for i, cfg in enumerate(entry.configs or ("-",))]
    listed = {cfg for entry in registry.RECIPES for cfg in entry.configs}
    rows += [("(no recipe)", name) for name in builtin_config_names() if name not in listed]
    width = max([len("RECIPE")] + [len(r[0]) for r in rows]) + 3
    print(f"{'RECIPE':<{width}}CONFIG")
    for recipe, cfg in rows:
        print(f"{recipe:<{width}}{cfg}")
    aliased = [e for e in registry.RECIPES if e.aliases]
    if aliased:
        print("\nALIASES")
        for entry in aliased:
            print(f"{entry.name:<{width}}{', '.join(entry.aliases)}")
    return 0


def _source_for_copy(name: str) -> Path:
    if (paths.CONFIGS_DIR / f"{name.removesuffix('.yaml')}.yaml").is_file():
        return paths.CONFIGS_DIR / f"{name.removesuffix('.yaml')}.yaml"
    entry = registry.find_recipe(name)
    if entry is not None:
        return entry.path
    names = builtin_config_names() + [e.name for e in registry.RECIPES]
    hint = did_you_mean(name, names)
    raise ConfigError(
        name, "", "no built-in config or recipe of that name", hint or "Run `ftcore ls` to see them."
    )


def cmd_cp(args: argparse.Namespace, overrides: list[str]) -> int:
    source = _source_for_copy(args.name)
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / source.name
    elif not dest.suffix:
        dest = dest.with_suffix(source.suffix)  # `ftcore cp llama3_1/8B_lora my` -> my.yaml
    if dest.exists() and not args.force:
        print(f"ftcore cp: error: {dest} already exists; pass --force to overwrite it", file=sys.stderr)
        return 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)
    print(f"Copied {source} to {dest}")
    return 0


def cmd_cat(args: argparse.Namespace, overrides: list[str]) -> int:
    source = str(resolve_config_path(args.name))
    cfg = apply_overrides(load_config(args.name), overrides, source=source)
    try:
        text = OmegaConf.to_yaml(cfg, resolve=args.resolve)
    except OmegaConfBaseException as exc:  # --resolve met a broken `${...}`
        raise interpolation_error(exc, source) from None
    print(text, end="")
    return 0


def _recipe_for_config(config: str) -> str | None:
    """The registered recipe that lists this built-in config, if exactly one does."""
    owners = [e.name for e in registry.RECIPES if config.removesuffix(".yaml") in e.configs]
    return owners[0] if len(owners) == 1 else None


def cmd_validate(args: argparse.Namespace, overrides: list[str]) -> int:
    recipe = args.recipe
    if recipe is not None and ("=" in recipe or recipe[:1] in "~+"):
        overrides, recipe = [recipe, *overrides], None  # `ftcore validate --config x a=1`: no recipe given
    recipe = recipe or _recipe_for_config(args.config)
    source = str(resolve_config_path(args.config))
    cfg = apply_overrides(load_config(args.config), overrides, source=source)
    if recipe is None:
        count = validate_config(cfg, source=source)
        note = "no recipe given: top-level keys and recipe-supplied arguments were not checked"
    else:
        count = validate_for_recipe(cfg, resolve_recipe(recipe), source)
        note = f"checked against recipe {recipe}"
    print(f"Config OK: {source} ({count} components; {note})")
    _warn_missing_inputs(cfg)
    return 0


def _warn_missing_inputs(cfg: DictConfig) -> None:
    keys_by_path: dict[str, list[str]] = {}
    for key, path in missing_input_paths(to_plain(cfg)):  # resolves: validation has just done so
        keys_by_path.setdefault(path, []).append(key)
    for path, keys in keys_by_path.items():
        print(
            f"warning: {', '.join(keys)}: {shown_path(path)} does not exist on this machine; "
            "the run stops at setup unless it exists where it runs",
            file=sys.stderr,
        )


def cmd_download(args: argparse.Namespace, overrides: list[str]) -> int:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        print("ftcore download: error: needs huggingface_hub; pip install 'ftcore[hub]'", file=sys.stderr)
        return 1
    token = args.hf_token or os.environ.get("HF_TOKEN")
    try:
        path = snapshot_download(
            args.repo_id, local_dir=args.output_dir, token=token, ignore_patterns=args.ignore_patterns or None
        )
    except (HfHubHTTPError, OSError, ValueError) as exc:  # offline, gated, missing repo, bad repo id
        cause = exc.__cause__ or exc  # offline, the network error is the cause of a cache miss
        reason = f"{type(cause).__name__}: {' '.join(str(cause).split())}"[:300]
        if isinstance(exc, LocalEntryNotFoundError):
            reason += " (the Hub cannot be reached and there is no local copy)"
        print(f"ftcore download: error: could not download {args.repo_id}: {reason}", file=sys.stderr)
        return 1
    print(f"Downloaded {args.repo_id} to {path}")
    return 0


def cmd_data(args: argparse.Namespace, overrides: list[str]) -> int:
    if importlib.util.find_spec("ftcore.data.check") is None:
        print(
            "ftcore data check: error: not available in this install (ftcore.data.check is missing)",
            file=sys.stderr,
        )
        return 1
    return importlib.import_module("ftcore.data.check").main(list(args.args))
