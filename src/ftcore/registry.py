"""The built-in recipes, their aliases and their configs, as `ftcore ls` and `ftcore run` see them."""

from __future__ import annotations

from dataclasses import dataclass, field

from ftcore.paths import RECIPES_DIR


@dataclass(frozen=True)
class RecipeEntry:
    name: str
    file_name: str
    configs: tuple[str, ...]
    aliases: tuple[str, ...] = field(default_factory=tuple)

    @property
    def path(self):
        return RECIPES_DIR / self.file_name


RECIPES: tuple[RecipeEntry, ...] = ()


def find_recipe(name: str) -> RecipeEntry | None:
    """Return the recipe called `name` (or one of its aliases), or None."""
    for entry in RECIPES:
        if name == entry.name or name in entry.aliases:
            return entry
    return None
