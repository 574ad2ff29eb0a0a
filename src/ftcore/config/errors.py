"""The one error type of the config system, and the did-you-mean helper every check shares."""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from ftcore.paths import RECIPES_DIR


class ConfigError(ValueError):
    """A user's config or override is wrong. The message names where, what, and how to fix it.

    Rendered as `<source>: `<key path>`: <problem>. <fix>` so that a user can jump straight to the
    offending line of their YAML file or command line.
    """

    def __init__(self, source: str, key: str, problem: str, fix: str = "") -> None:
        self.source, self.key, self.problem, self.fix = source, key, problem, fix
        where = f"{source}: `{key}`" if key else source
        super().__init__(f"{where}: {problem}." + (f" {fix}" if fix else ""))


class RunSetupError(ConfigError):
    """A recipe's setup refused the run before training (a bad value, a missing file). Shown as the one
    line its message is, like a config error; `FTCORE_TRACEBACK=1` keeps the traceback instead."""

    def __init__(self, error: Exception) -> None:
        ValueError.__init__(
            self, f"{str(error).rstrip('.')} (while setting up the run; FTCORE_TRACEBACK=1 shows where)"
        )
        self.source, self.key, self.problem, self.fix = "", "", str(error), ""


def run_setup(setup: Callable[[], object]) -> None:
    """Call a recipe's `setup`, turning what ftcore's own checks refuse into a `RunSetupError`.

    Only a plain ValueError raised by ftcore's or a recipe's code (its checks name the key or file and the
    fix), or a FileNotFoundError that names its file: a JSONDecodeError, a torch error or a bug elsewhere
    keeps its traceback."""
    try:
        setup()
    except (ValueError, FileNotFoundError) as error:
        if isinstance(error, ConfigError) or _traceback_wanted() or not _raised_by_our_check(error):
            raise
        raise RunSetupError(error) from error


def _traceback_wanted() -> bool:
    return os.environ.get("FTCORE_TRACEBACK", "0").lower() not in ("", "0", "false", "no")


def _raised_by_our_check(error: BaseException) -> bool:
    if isinstance(error, FileNotFoundError):
        return error.filename is not None
    if type(error) is not ValueError:  # subclasses (JSONDecodeError, UnicodeDecodeError) are not checks
        return False
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    where = Path(frame.tb_frame.f_code.co_filename).resolve() if frame is not None else Path()
    return any(where.is_relative_to(root) for root in (Path(__file__).resolve().parents[1], RECIPES_DIR))


def did_you_mean(word: str, candidates: Iterable[str], listing: str = "") -> str:
    """`Did you mean `x`?` for the closest names to `word`, or a listing of the valid names.

    difflib's ratio with cutoff 0.6 catches transpositions and one- or two-letter typos of names
    such as `lora_rnak` -> `lora_rank` without suggesting unrelated keys.
    """
    names = sorted({c for c in candidates if not c.startswith("_")})
    close = difflib.get_close_matches(word, names, n=3, cutoff=0.6)
    if close:
        return "Did you mean " + " or ".join(f"`{c}`" for c in close) + "?"
    if names and listing:
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        return f"{listing}: {shown}."
    return ""
