"""The input files a config names that are not on this machine, for `ftcore validate`.

Validation loads nothing, so it cannot know a checkpoint is wrong; it can say a path is absent, which
is the commonest reason a run that validated stops at setup (weights not downloaded yet, a relative
path run from another directory). These are warnings, not errors: a config is often validated on a
laptop and run on the machine that holds the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Component arguments that name a file or folder the run reads.
PATH_ARGUMENTS = ("path", "checkpoint_dir")
# Dataset arguments that are a local path or a Hugging Face dataset name.
DATA_ARGUMENTS = ("source", "data_files")
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow", ".gz")


def missing_input_paths(plain: dict[str, Any]) -> list[tuple[str, str]]:
    """(dotted key, path) of each input path in the resolved config that does not exist here.

    Paths inside `output_dir` are left out: the run writes them (the demo generates its data there)."""
    output_dir = plain.get("output_dir")
    outputs = Path(str(output_dir)).expanduser().absolute() if output_dir else None
    missing = []
    for key, path in _input_paths(plain, ""):
        local = Path(path).expanduser()
        if not local.exists() and not (outputs and local.absolute().is_relative_to(outputs)):
            missing.append((key, path))
    resume = plain.get("resume_from_checkpoint")
    if isinstance(resume, str) and not Path(resume).expanduser().exists():
        missing.append(("resume_from_checkpoint", resume))
    return missing


def _input_paths(node: Any, prefix: str) -> list[tuple[str, str]]:
    if isinstance(node, list):
        return [found for i, item in enumerate(node) for found in _input_paths(item, f"{prefix}[{i}]")]
    if not isinstance(node, dict):
        return []
    found: list[tuple[str, str]] = []
    in_component = "_component_" in node
    for key, value in node.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if in_component and key in PATH_ARGUMENTS and isinstance(value, str):
            found.append((dotted, value))
        elif in_component and key in DATA_ARGUMENTS:
            found += [(dotted, v) for v in _as_list(value) if looks_local(v)]
        else:
            found += _input_paths(value, dotted)
    return found


def _as_list(value: Any) -> list[str]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, str)]


def looks_local(source: str) -> bool:
    """`org/name` is a Hub dataset; a file suffix or a leading /, ., ~ is a local path."""
    return source.startswith(("/", ".", "~")) or source.lower().endswith(DATA_SUFFIXES)
