"""Where the project's built-in configs and recipes live.

ftcore is installed from its checkout (`pip install -e .`), so the built-in `configs/` and
`recipes/` folders sit two levels above this package, beside `src/`.
"""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIGS_DIR = PROJECT_ROOT / "configs"
RECIPES_DIR = PROJECT_ROOT / "recipes"


def shown_path(path: str | Path) -> str:
    """A path for an error message: a relative one says where it was resolved from (the shipped
    configs point at `../shared/assets`, which exists only when run from the project root)."""
    path = Path(path)
    return str(path) if path.is_absolute() else f"{path} (relative to the current directory {Path.cwd()})"
