"""Find a recipe (registry name, alias or .py path), read what it declares, and import it.

`CONFIG_KEYS` and `RUNTIME_ARGS` are read from the recipe file's syntax tree when they are literals,
so a config is validated before the recipe module (and the model code it imports) is even loaded.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, cast

from omegaconf import DictConfig

from ftcore import registry
from ftcore.config import ConfigError, validate_config
from ftcore.config.errors import did_you_mean

_TYPE_NAMES = {t.__name__: t for t in (dict, list, tuple, int, float, str, bool)}


@dataclass(frozen=True)
class RecipeDeclarations:
    config_keys: dict[str, Any] | None  # None: the recipe declares none, top-level keys go unchecked
    # top-level key -> what the recipe passes at instantiate time (names; an int counts positionals);
    # None: not declared, so missing arguments of top-level components go unchecked
    runtime_args: dict[str, tuple[str | int, ...]] | None


def resolve_recipe(name: str) -> Path:
    """A registered name or alias, else a path to a .py file."""
    entry = registry.find_recipe(name)
    if entry is not None:
        return entry.path
    path = Path(name)
    if path.suffix == ".py" and path.is_file():
        # As `python recipe.py` would, put the recipe's folder on sys.path: the recipe and its config's
        # `_component_`s may then name modules that sit beside it.
        if str(path.resolve().parent) not in sys.path:
            sys.path.insert(0, str(path.resolve().parent))
        return path.resolve()
    names = [e.name for e in registry.RECIPES] + [a for e in registry.RECIPES for a in e.aliases]
    hint = did_you_mean(name, names)
    raise ConfigError(
        name,
        "",
        "no built-in recipe of that name and no such .py file",
        (hint + " " if hint else "")
        + "Run `ftcore ls` for the built-in recipes, or pass a path to a recipe file.",
    )


def _literal_type(node: ast.expr) -> Any:
    """`int` -> int, `None`/`type(None)` -> NoneType, `(int, float)` -> tuple; ValueError otherwise."""
    if isinstance(node, ast.Name) and node.id in _TYPE_NAMES:
        return _TYPE_NAMES[node.id]
    if isinstance(node, ast.Constant) and node.value is None:
        return type(None)
    if isinstance(node, ast.Call) and ast.unparse(node) == "type(None)":
        return type(None)
    if isinstance(node, ast.Tuple):
        return tuple(_literal_type(e) for e in node.elts)
    raise ValueError(ast.unparse(node))


def _assigned_values(tree: ast.Module) -> dict[str, ast.expr]:
    values = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            values[stmt.targets[0].id] = stmt.value
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            values[stmt.target.id] = stmt.value
    return values


def static_declarations(path: Path) -> RecipeDeclarations | None:
    """CONFIG_KEYS and RUNTIME_ARGS read from the file's syntax tree; None if they are not literals."""
    values = _assigned_values(ast.parse(path.read_text(), filename=str(path)))
    keys_node, args_node = values.get("CONFIG_KEYS"), values.get("RUNTIME_ARGS")
    try:
        config_keys = None
        if keys_node is not None:
            if not isinstance(keys_node, ast.Dict) or None in keys_node.keys:  # e.g. {**BASE, ...}
                return None
            config_keys = {
                # no None key: checked above
                ast.literal_eval(cast(ast.expr, k)): _literal_type(v)
                for k, v in zip(keys_node.keys, keys_node.values)
            }
        runtime_args = ast.literal_eval(args_node) if args_node is not None else None
    except ValueError:  # built by code (a call, a name): only the imported module knows
        return None
    return _declarations(config_keys, runtime_args)


def _declarations(config_keys: Any, runtime_args: Any) -> RecipeDeclarations:
    if runtime_args is not None:
        runtime_args = {k: tuple(v) for k, v in runtime_args.items()}
    return RecipeDeclarations(config_keys, runtime_args)


def validate_for_recipe(cfg: DictConfig, recipe_path: Path, source: str) -> int:
    """Validate `cfg` for the recipe; the component graph is checked before any recipe code runs."""
    declarations = static_declarations(recipe_path)
    if declarations is None:
        # Dynamic declarations need the import, which may pull in heavy model code: catch typos first.
        validate_config(cfg, source=source)
        module = import_recipe(recipe_path)
        declarations = _declarations(
            getattr(module, "CONFIG_KEYS", None), getattr(module, "RUNTIME_ARGS", None)
        )
    count = validate_config(cfg, declarations.config_keys, source, declarations.runtime_args)
    if declarations.config_keys and "enable_activation_checkpointing" in declarations.config_keys:
        _check_speed_options(cfg, source)
    _check_loss_values(cfg, source)
    return count


def _check_loss_values(cfg: DictConfig, source: str) -> None:
    """Build the config's `loss` when it is one of ftcore's (they hold a few numbers and load nothing), so
    `ftcore validate` reports a value its constructor refuses (a negative DPO beta, a zero chunk size)."""
    from ftcore.config import instantiate

    node = cfg.get("loss")
    component = node.get("_component_") if isinstance(node, DictConfig) else None
    if not (isinstance(component, str) and component.startswith("ftcore.")):
        return
    try:
        instantiate(node)
    except ValueError as error:
        raise ConfigError(source, "loss", str(error).rstrip(".")) from error


def _check_speed_options(cfg: DictConfig, source: str) -> None:
    """The speed/memory switches' combinations (checkpointing modes, offloading, chunking), as the
    run checks them before building: so `ftcore validate` reports them too, loading nothing."""
    from ftcore.distributed.parallelize import speed_options

    try:
        speed_options(cfg)
    except ValueError as error:
        raise ConfigError(source, "", str(error).rstrip(".")) from error


def import_recipe(path: Path) -> ModuleType:
    """Import a recipe file by path (it need not be on sys.path or in a package)."""
    module_name = f"ftcore_recipe_{path.stem}"
    if module_name in sys.modules and getattr(sys.modules[module_name], "__file__", None) == str(path):
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:  # a .py path (resolve_recipe) always has both
        raise ImportError(f"cannot import the recipe file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    if not callable(getattr(module, "recipe_main", None)):
        raise ConfigError(
            str(path), "recipe_main", "the recipe file defines no `recipe_main(cfg)`", "Add one."
        )
    return module
