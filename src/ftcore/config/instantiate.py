"""Build objects from `_component_` graphs: `instantiate(cfg.model)`.

A node is a mapping whose `_component_` is the dotted path of a callable and whose other keys are its
keyword arguments. Nested nodes (and lists of them) are built first, innermost out; mappings without
`_component_` become plain dicts. Interpolations (`${...}`) are resolved before anything is built.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from ftcore.config.errors import ConfigError, did_you_mean

COMPONENT_KEY = "_component_"


def to_plain(cfg: Any, source: str = "config", prefix: str = "") -> Any:
    """Resolve interpolations and return plain dicts/lists; a broken `${...}` or `???` is a ConfigError."""
    if not isinstance(cfg, (DictConfig, ListConfig)):
        return cfg
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        key = ".".join(filter(None, [prefix, str(exc.full_key)]))
        raise ConfigError(
            source, key, "a required value is not set (`???`)", f"Set it: `{key}=VALUE`."
        ) from None
    except OmegaConfBaseException as exc:
        raise interpolation_error(exc, source, prefix) from None


def interpolation_error(exc: OmegaConfBaseException, source: str, prefix: str = "") -> ConfigError:
    """OmegaConf's error on a broken `${...}` as a ConfigError naming the key."""
    key = ".".join(filter(None, [prefix, str(getattr(exc, "full_key", "") or "")]))
    problem = str(exc).splitlines()[0]
    return ConfigError(source, key, f"cannot resolve interpolation: {problem}", "Fix the `${...}` reference.")


def _is_module_path(name: str, missing: str | None) -> bool:
    """True when the ModuleNotFoundError is about `name` itself (or a parent), not one of its imports."""
    return missing is not None and (name == missing or name.startswith(missing + "."))


def locate(dotted: str, source: str = "config", key: str = COMPONENT_KEY) -> Any:
    """Import `pkg.module.attr` and return the callable, or a ConfigError with the closest names."""
    parts = dotted.split(".") if isinstance(dotted, str) else []
    if not parts or not all(p.isidentifier() for p in parts):
        raise ConfigError(
            source, key, f"`{dotted}` is not a dotted Python path", "Write e.g. `torch.nn.Linear`."
        )
    obj, found = None, 0
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        try:
            obj, found = importlib.import_module(name), n
            break
        except ModuleNotFoundError as exc:
            if not _is_module_path(name, exc.name):
                raise ConfigError(
                    source, key, f"importing `{name}` failed: {exc}", "Install the missing package."
                ) from None
    if obj is None:
        raise ConfigError(
            source, key, f"cannot import `{dotted}`: no module named `{parts[0]}`", "Check the spelling."
        )
    for depth in range(found, len(parts)):
        attr = parts[depth]
        if not hasattr(obj, attr):
            owner = ".".join(parts[:depth])
            hint = did_you_mean(attr, dir(obj), listing=f"Names in `{owner}`")
            raise ConfigError(source, key, f"cannot import `{dotted}`: `{owner}` has no `{attr}`", hint)
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ConfigError(
            source, key, f"`{dotted}` is not callable", "Point `_component_` at a class or function."
        )
    return obj


def _build_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        if COMPONENT_KEY in value:
            return _build(value, (), {})
        return {k: _build_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_build_value(v) for v in value]
    return value


def _build(node: Mapping, args: tuple, kwargs: dict) -> Any:
    target = locate(node[COMPONENT_KEY])
    # Caller kwargs win, and a config value they replace is never built.
    params = {k: _build_value(v) for k, v in node.items() if k != COMPONENT_KEY and k not in kwargs}
    return target(*args, **params, **kwargs)


def instantiate(node: Any, *args: Any, **kwargs: Any) -> Any:
    """Build the object a `_component_` node describes; `args` go first, `kwargs` override the config.

    `instantiate(None)` is None, so optional components (`profiler: null`) need no special case.
    """
    if node is None:
        return None
    plain = to_plain(node)
    if not isinstance(plain, Mapping) or COMPONENT_KEY not in plain:
        raise ConfigError(
            "instantiate",
            "",
            f"expected a mapping with `{COMPONENT_KEY}`, got {type(plain).__name__}",
            "Pass a config node such as `cfg.model`.",
        )
    return _build(plain, args, kwargs)
