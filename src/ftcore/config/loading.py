"""Load a YAML config by built-in name or path, and apply torchtune-style command-line overrides.

Override syntax (applied in order, after the file, so they win):
    a.b.c=value     set an existing key; the value is typed by YAML rules (3, 1e-4, true, null, [a,b])
    model=pkg.fn    on a node that has `_component_`, a plain string sets that node's `_component_`
    +a.new=value    add a key that does not exist yet (intermediate mappings are created)
    ~a.b            delete a key
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ftcore import paths
from ftcore.config.errors import ConfigError, did_you_mean

COMPONENT_KEY = "_component_"


def builtin_config_names() -> list[str]:
    """Names of the configs shipped in configs/, e.g. `llama3_1/8B_lora`."""
    root = paths.CONFIGS_DIR
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path to an existing file wins; otherwise `name` means configs/<name>.yaml."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = str(name_or_path).removesuffix(".yaml")
    builtin = paths.CONFIGS_DIR / f"{name}.yaml"
    if builtin.is_file():
        return builtin
    hint = did_you_mean(name, builtin_config_names())
    raise ConfigError(
        str(name_or_path),
        "",
        "no such config file, and no built-in config of that name",
        (hint + " " if hint else "")
        + "Run `ftcore ls` for the built-in configs, or pass a path to a .yaml file.",
    )


def load_config(name_or_path: str | Path) -> DictConfig:
    """Read a config file into a DictConfig; malformed YAML names the line and column."""
    path = resolve_config_path(name_or_path)
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            str(path), "", f"malformed YAML{where}: {problem}", "Fix the YAML syntax there."
        ) from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(
            str(path), "", "the top level is a list", "A config must be a mapping of `key: value`."
        )
    return cfg


def parse_value(raw: str):
    """Type a command-line value by YAML 1.2-style rules (OmegaConf's loader: `1e-4` is a float)."""
    if raw == "":
        return ""
    if raw == "None":  # Python spelling of null, as torchtune users type it
        return None
    return cast(dict, OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"])))["v"]


def _child(node, part: str):
    if isinstance(node, ListConfig):
        return node[int(part)] if part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node) else None
    return node[part] if isinstance(node, DictConfig) and part in node else None


def _has(node, part: str) -> bool:
    if isinstance(node, ListConfig):
        return part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node)
    return isinstance(node, DictConfig) and part in node


def _parent_of(cfg: DictConfig, key: str, source: str, create: bool = False):
    """Walk to the node that holds the last part of `key`, with did-you-mean on a missing step."""
    parts = key.split(".")
    node = cfg
    for depth, part in enumerate(parts[:-1]):
        if not _has(node, part):
            if create and isinstance(node, DictConfig):
                node[part] = {}
            else:
                _raise_missing(node, ".".join(parts[: depth + 1]), source)
        node = _child(node, part)
    return node, parts[-1]


def _raise_missing(node, path: str, source: str, deleting: bool = False) -> None:
    last = path.rsplit(".", 1)[-1]
    keys = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
    hints = [did_you_mean(last, keys, listing="Keys here")]
    if isinstance(node, ListConfig):
        n = len(node)
        size = f"{n} {'entry' if n == 1 else 'entries'} (0 to {n - 1})" if n else "no entries"
        parent = path.rsplit(".", 1)[0]
        hints.append(f"The list has {size}." + ("" if deleting else f" Append one with `+{parent}.{n}=...`."))
    elif not deleting:  # adding is the fix for a missing key, never for deleting one
        hints.append(f"To add a new key, write `+{path}=...`.")
    raise ConfigError(source, path, "no such key in the config", " ".join(h for h in hints if h))


def apply_overrides(cfg: DictConfig, overrides: list[str], source: str = "command line") -> DictConfig:
    """Return a copy of `cfg` with the overrides applied in order; bad overrides raise ConfigError."""
    cfg = cfg.copy()
    for override in overrides:
        where = f"{source} override `{override}`"
        if override.startswith("~"):
            key = override[1:]
            if not key or "=" in key:
                raise ConfigError(where, key, "malformed delete", "Write `~key.path` with no value.")
            parent, last = _parent_of(cfg, key, where)
            if not _has(parent, last):
                _raise_missing(parent, key, where, deleting=True)
            del parent[int(last) if isinstance(parent, ListConfig) else last]
            continue
        key, sep, raw = override.partition("=")
        adding = key.startswith("+")
        key = key.removeprefix("+")
        if not sep or not key:
            raise ConfigError(
                where, key, "malformed override", "Write `key.path=value`, `+new.key=value` or `~key.path`."
            )
        try:
            value = parse_value(raw)
        except (yaml.YAMLError, OmegaConfBaseException) as error:  # scanner, parser, interpolation grammar
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(
                where, key, f"the value is not valid YAML ({problem})",
                "Quote the whole override for the shell, close every [ and {, and put a space after each : "
                "inside braces, e.g. 'model.lora_attn_modules=[q_proj, v_proj]'",
            ) from None  # fmt: skip
        parent, last = _parent_of(cfg, key, where, create=adding)
        _check_container(parent, key, where)
        exists = _has(parent, last)
        if adding and exists:
            raise ConfigError(
                where, key, "the key already exists", f"Drop the `+` to override it: `{key}={raw}`."
            )
        if not adding and not exists:
            _raise_missing(parent, key, where)
        current = _child(parent, last) if exists else None
        if isinstance(current, DictConfig) and COMPONENT_KEY in current and isinstance(value, str):
            current[COMPONENT_KEY] = value  # `model=ftcore.models.llama3_1_8b` swaps the builder only
        elif isinstance(parent, ListConfig) and not exists:
            _append_to_list(parent, last, key, value, where)
        else:
            parent[int(last) if isinstance(parent, ListConfig) else last] = value
    return cfg


def _check_container(parent, key: str, where: str) -> None:
    """The node an override writes into must be a mapping or a list, not a value such as null."""
    if not isinstance(parent, (DictConfig, ListConfig)):
        holder = key.rsplit(".", 1)[0]
        raise ConfigError(
            where, key, f"`{holder}` is {parent!r}, not a mapping or a list",
            f"Set it as a whole instead, e.g. `{holder}={{{key.rsplit('.', 1)[-1]}: ...}}`.",
        )  # fmt: skip


def _append_to_list(parent: ListConfig, last: str, key: str, value, where: str) -> None:
    """`+list.N=value` adds an item at the end only (N = the current length)."""
    if not (last.isdigit() and int(last) == len(parent)):
        raise ConfigError(
            where, key, f"the list has {len(parent)} item(s)",
            f"Add an item at the end with `+{key.rsplit('.', 1)[0]}.{len(parent)}=...`.",
        )  # fmt: skip
    parent.append(value)
