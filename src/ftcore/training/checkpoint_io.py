"""Atomic checkpoint writes, pruning of old checkpoints, and finding the one to resume from.

Atomic means: write into a temporary sibling (same folder, so same filesystem), fsync, then
`os.replace` it onto the final name. A kill at any moment leaves either the old checkpoint or the
complete new one, never a half-written file. Temporaries start with `.tmp-` and are ignored (and
cleaned up by `keep_last_n`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

TMP_PREFIX = ".tmp-"
CHECKPOINT_DIR = re.compile(r"^(step|epoch)_(\d+)$")
STATE_FILE = "training_state.pt"
STATE_SUMMARY = "training_state.json"  # {"step", "epoch"}: read without unpickling the optimizer


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable (POSIX); not available on Windows, where the rename suffices.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _read_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back (once, at import,
    os.umask(mask)  # before any thread of ours creates files)
    return mask


_UMASK = _read_umask()


def _with_default_mode(path: Path, mode: int) -> Path:
    # mkstemp / mkdtemp create 0600 / 0700 (private); a checkpoint should get the permissions any file
    # or folder created here gets (e.g. 0644 / 0755 under umask 022), so others sharing the machine can
    # read it. The setgid bit a shared project folder passes down is kept; a filesystem that refuses
    # chmod leaves the private mode, not a failed save.
    with contextlib.suppress(OSError):
        os.chmod(path, (path.stat().st_mode & 0o7000) | (mode & ~_UMASK))
    return path


def atomic_write_file(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call write(tmp_path), fsync it, and move it onto `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}-", dir=path.parent)
    os.close(fd)
    tmp = _with_default_mode(Path(tmp_name), 0o666)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_torch_save(obj, path: str | Path) -> Path:
    return atomic_write_file(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_json(obj, path: str | Path) -> Path:
    return atomic_write_file(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def _fsync_tree(root: Path) -> None:
    for file in root.rglob("*"):
        if file.is_file():
            with open(file, "rb+") as handle:
                os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_write_dir(final_dir: str | Path) -> Iterator[Path]:
    """`with atomic_write_dir(out / "step_100") as tmp:` write files into tmp; on success tmp becomes step_100.

    If final_dir already exists it is swapped out and deleted after the new one is in place; an
    exception inside the block deletes tmp and leaves final_dir untouched.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final_dir.name}-", dir=final_dir.parent))
    _with_default_mode(tmp, 0o777)
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if final_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}old-{final_dir.name}-", dir=final_dir.parent))
            os.replace(final_dir, old / final_dir.name)
        os.replace(tmp, final_dir)
        _fsync_dir(final_dir.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """step_N / epoch_N folders under output_dir, oldest first (by N within each kind, steps before epochs)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        (m.group(1), int(m.group(2)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_DIR.match(p.name))
    ]
    return [p for _, _, p in sorted(found, key=lambda item: (item[0] != "step", item[1]))]


def keep_last_n(output_dir: str | Path, n: int) -> list[Path]:
    """Delete all but the newest n `step_*` folders and, separately, the newest n `epoch_*` folders.

    Step and epoch numbers are not comparable, so each kind is pruned on its own; folders with other
    names (e.g. `best`) are never touched, nor are incomplete ones (no training state: not ours to judge,
    and counting them could delete the checkpoint a resume needs). Stale temporaries from killed saves
    are removed. Returns the deleted paths.
    """
    if n < 1:
        raise ValueError(f"keep_last_n must be >= 1, got {n}")
    output_dir = Path(output_dir)
    deleted = []
    for kind in ("step", "epoch"):
        of_kind = [
            p
            for p in list_checkpoints(output_dir)
            if p.name.startswith(f"{kind}_") and is_complete_checkpoint(p)
        ]
        for path in of_kind[:-n]:
            # Renamed first: a prune killed mid-delete leaves a temporary, which the sweep below removes,
            # never a half-deleted checkpoint under its own name.
            doomed = path.with_name(f"{TMP_PREFIX}pruned-{path.name}")
            os.replace(path, doomed)
            shutil.rmtree(doomed)
            deleted.append(path)
    for stale in output_dir.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    return deleted


def is_complete_checkpoint(path: Path) -> bool:
    """A checkpoint folder holding its training state and (written last) the state's summary."""
    return (path / STATE_FILE).is_file() and (path / STATE_SUMMARY).is_file()


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint (one holding a training state) with the highest global step, or None."""
    best, best_step = None, -1
    for path in list_checkpoints(output_dir):
        if not is_complete_checkpoint(path):
            continue
        step = int(json.loads((path / STATE_SUMMARY).read_text())["step"])
        if step >= best_step:
            best, best_step = path, step
    return best
