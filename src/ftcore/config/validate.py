"""Check a whole config before any heavy work: typos and wrong types fail on step -1, not step 0.

Every `_component_` is imported and its keys are bound to the target's signature: unknown keyword
(did-you-mean), missing required argument, and a wrong type where the parameter is annotated with a
simple type (int, float, str, bool, list, dict, tuple, Optional/Union of those). A recipe's
`CONFIG_KEYS` bounds the top level. Nothing is constructed.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections import abc
from collections.abc import Iterable, Mapping
from pathlib import PurePath
from typing import Any

from omegaconf import DictConfig

from ftcore.config.errors import ConfigError, did_you_mean
from ftcore.config.instantiate import COMPONENT_KEY, locate, to_plain

NoneType = type(None)
_SIMPLE = (int, float, str, bool, list, dict, tuple, NoneType)
_KEYWORD_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _simple_types(hint: Any) -> tuple[type, ...] | None:
    """The plain types a hint allows, or None when the hint is too rich to check (Path, Tensor, ...)."""
    if hint in _SIMPLE:
        return (hint,)
    origin = typing.get_origin(hint)
    if origin in (list, dict, tuple):  # list[str] is checked as list
        return (origin,)
    if origin in (abc.Sequence, abc.MutableSequence):  # from YAML only a list is a sequence (not a str)
        return (list,)
    if origin in (typing.Union, types.UnionType):
        # In a union the author listed what is accepted: `float | Tensor` rejects the string "abc".
        # A Path member accepts a YAML string; Callable, Any, TypeVar etc. make the hint uncheckable.
        members: list[type] = []
        for arg in typing.get_args(hint):
            simple = _simple_types(arg)
            if simple is None and not isinstance(arg, type):
                return None
            members += simple or ((str, arg) if issubclass(arg, PurePath) else (arg,))
        return tuple(dict.fromkeys(members))
    return None


def _matches(value: Any, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # bool is an int subclass; `lora_rank=true` is still wrong
        return bool in allowed
    if isinstance(value, int):
        return int in allowed or float in allowed
    if isinstance(value, list):  # YAML has no tuples
        return list in allowed or tuple in allowed
    return isinstance(value, allowed)


def _type_name(allowed: tuple[type, ...]) -> str:
    return " or ".join("None" if t is NoneType else t.__name__ for t in allowed)


def _check_type(value: Any, allowed: tuple[type, ...], source: str, key: str) -> None:
    if _matches(value, allowed):
        return
    got = f"{type(value).__name__} {value!r}"
    fix = f"Set `{key}` to a value of type {_type_name(allowed)}"
    if isinstance(value, str):
        fix += " (a command-line value is typed by YAML rules: `8` is an int, `'8'` and `eight` are strings)"
    raise ConfigError(source, key, f"expected {_type_name(allowed)}, got {got}", fix + ".")


def _type_hints(target: Any) -> dict[str, Any]:
    try:
        while isinstance(target, functools.partial):  # builders are partials of a general function
            target = target.func
        return typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except (NameError, TypeError, AttributeError):  # unresolvable forward refs: skip type checks only
        return {}


def _check_component(node: Mapping, path: str, source: str, supplied: Iterable[str | int] | None) -> None:
    target = locate(node[COMPONENT_KEY], source, f"{path}.{COMPONENT_KEY}")
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # some C builtins have no signature: nothing to bind against
        return
    params = signature.parameters
    named = [p.name for p in params.values() if p.kind in _KEYWORD_KINDS]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    args = {k: v for k, v in node.items() if k != COMPONENT_KEY}
    for key in args:
        if key not in named and not takes_any:
            hint = did_you_mean(key, named, listing=f"`{node[COMPONENT_KEY]}` takes")
            raise ConfigError(source, f"{path}.{key}", f"unknown argument for `{node[COMPONENT_KEY]}`", hint)
    if supplied is not None:
        # Ints in `supplied` count leading positional arguments the recipe passes (e.g. the tokenizer).
        n_positional = sum(s for s in supplied if isinstance(s, int))
        leading = [p.name for p in params.values() if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        given = set(args) | {s for s in supplied if isinstance(s, str)} | set(leading[:n_positional])
        for p in params.values():
            if p.kind in _KEYWORD_KINDS and p.default is inspect.Parameter.empty and p.name not in given:
                raise ConfigError(
                    source,
                    f"{path}.{p.name}",
                    f"missing required argument of `{node[COMPONENT_KEY]}`",
                    f"Add `{p.name}:` under `{path}` in the file, or `+{path}.{p.name}=VALUE` on the command line.",
                )
    hints = _type_hints(target)
    for key, value in args.items():
        allowed = _simple_types(hints.get(key))
        is_component = isinstance(value, Mapping) and COMPONENT_KEY in value
        if allowed is not None and not is_component:
            _check_type(value, allowed, source, f"{path}.{key}")


def _walk(value: Any, path: str, source: str, runtime_args: Mapping[str, Iterable[str | int]] | None) -> int:
    """Check every component under `value`; returns how many were checked."""
    count = 0
    if isinstance(value, Mapping):
        if COMPONENT_KEY in value:
            # Only top-level nodes receive arguments from the recipe; nested ones get exactly the config.
            top_level = "." not in path
            supplied = (None if runtime_args is None else runtime_args.get(path, ())) if top_level else ()
            _check_component(value, path, source, supplied)
            count += 1
        for key, child in value.items():
            if key != COMPONENT_KEY:
                count += _walk(child, f"{path}.{key}" if path else str(key), source, runtime_args)
    elif isinstance(value, list):
        for i, child in enumerate(value):
            count += _walk(child, f"{path}.{i}", source, runtime_args)
    return count


def _check_top_level(plain: Mapping, config_keys: Mapping[str, Any], source: str) -> None:
    for key, value in plain.items():
        if key not in config_keys:
            hint = did_you_mean(key, config_keys, listing="The recipe reads")
            raise ConfigError(source, key, "not a key the recipe reads", hint or "Delete it.")
        expected = config_keys[key]
        allowed = tuple(
            NoneType if t is None else t for t in (expected if isinstance(expected, tuple) else (expected,))
        )
        _check_type(value, allowed, source, key)


def validate_config(
    cfg: DictConfig,
    recipe_config_keys: Mapping[str, Any] | None = None,
    source: str = "config",
    runtime_args: Mapping[str, Iterable[str | int]] | None = None,
) -> int:
    """Raise ConfigError on the first problem; return the number of components checked.

    `runtime_args` (a recipe's `RUNTIME_ARGS`) maps a top-level key to what its recipe passes at
    instantiate time: keyword names, and an int for a count of leading positional arguments, e.g.
    `{"dataset": (1,), "lr_scheduler": (1, "num_training_steps")}`. Missing-argument checks of
    top-level components run only when it is given: without the recipe we cannot know what it supplies.
    """
    plain = to_plain(cfg, source)
    if recipe_config_keys is not None:
        _check_top_level(plain, recipe_config_keys, source)
    return _walk(plain, "", source, runtime_args)
