"""The built-in recipes, their aliases and their configs, as `ftcore ls` and `ftcore run` see them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ftcore.paths import CONFIGS_DIR, RECIPES_DIR


@dataclass(frozen=True)
class RecipeEntry:
    name: str
    file_name: str
    config_patterns: tuple[str, ...]
    aliases: tuple[str, ...] = ()

    @property
    def path(self) -> Path:
        return RECIPES_DIR / self.file_name

    @property
    def configs(self) -> tuple[str, ...]:
        """Built-in config names (`family/size_method`) that this recipe runs, found by file pattern."""
        names = {
            str(path.relative_to(CONFIGS_DIR).with_suffix(""))
            for pattern in self.config_patterns
            for path in CONFIGS_DIR.glob(pattern)
        }
        return tuple(sorted(names))


RECIPES: tuple[RecipeEntry, ...] = (
    RecipeEntry(
        "full_finetune",
        "full_finetune.py",
        ("*/*_full.yaml", "demo/*_full.yaml"),
        aliases=("full_finetune_single_device", "full_finetune_distributed"),
    ),
    RecipeEntry(
        "lora_finetune",
        "lora_finetune.py",
        ("*/*_lora.yaml", "*/*_qlora.yaml", "*/*_dora.yaml"),
        aliases=("lora_finetune_single_device", "lora_finetune_distributed", "qlora_finetune"),
    ),
    RecipeEntry(
        "lora_dpo",
        "lora_dpo.py",
        ("*/*_lora_dpo.yaml", "*/*_qlora_dpo.yaml"),
        aliases=("lora_dpo_single_device", "lora_dpo_distributed"),
    ),
    RecipeEntry("generate", "generate.py", ("generate/*.yaml",)),
)


def find_recipe(name: str) -> RecipeEntry | None:
    """Return the recipe called `name` (or one of its aliases), or None."""
    for entry in RECIPES:
        if name == entry.name or name in entry.aliases:
            return entry
    return None
