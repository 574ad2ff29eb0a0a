"""Where the project's built-in configs and recipes live.

ftcore is installed from its checkout (`pip install -e .`), so the built-in `configs/` and
`recipes/` folders sit two levels above this package, beside `src/`.
"""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIGS_DIR = PROJECT_ROOT / "configs"
RECIPES_DIR = PROJECT_ROOT / "recipes"
