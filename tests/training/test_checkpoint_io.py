"""Atomic writes survive a SIGKILL mid-write; pruning and latest-checkpoint discovery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from ftcore.training import (
    atomic_write_dir,
    atomic_write_file,
    atomic_write_json,
    find_latest_checkpoint,
    keep_last_n,
)

KILL_MID_WRITE = """
import sys, time
from pathlib import Path
from ftcore.training import atomic_write_file

def slow_write(tmp: Path):
    with open(tmp, "w") as f:
        f.write("partial")
        f.flush()
        print("writing", flush=True)
        time.sleep(60)

atomic_write_file(sys.argv[1], slow_write)
"""


def test_sigkill_during_write_keeps_previous_file(tmp_path):
    target = tmp_path / "training_state.json"
    atomic_write_json({"step": 1}, target)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_MID_WRITE, str(target)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "writing"  # the temp file is half written now
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads(target.read_text()) == {"step": 1}
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1  # the killed temp is there, ignored, and pruned by keep_last_n
    keep_last_n(tmp_path, 1)
    assert [p.name for p in tmp_path.iterdir()] == ["training_state.json"]


def test_exception_during_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def failing(tmp):
        tmp.write_text("new but broken")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write_file(target, failing)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_write_dir_replaces_whole_folder_or_nothing(tmp_path):
    final = tmp_path / "step_2"
    with atomic_write_dir(final) as tmp:
        (tmp / "a.txt").write_text("v1")
        assert not final.exists()  # invisible until complete
    assert (final / "a.txt").read_text() == "v1"
    with pytest.raises(RuntimeError), atomic_write_dir(final) as tmp:
        (tmp / "a.txt").write_text("v2")
        raise RuntimeError("killed")
    assert (final / "a.txt").read_text() == "v1"
    with atomic_write_dir(final) as tmp:
        (tmp / "b.txt").write_text("v3")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2"]


def make_checkpoint(root, name, step, complete=True):
    folder = root / name
    folder.mkdir()
    if complete:
        (folder / "training_state.pt").write_bytes(b"x")
        (folder / "training_state.json").write_text(json.dumps({"step": step, "epoch": 0}))
    return folder


def test_keep_last_n_prunes_steps_and_epochs_separately(tmp_path):
    for step in (10, 2, 30, 20):
        make_checkpoint(tmp_path, f"step_{step}", step)
    for epoch in (0, 1, 2):
        make_checkpoint(tmp_path, f"epoch_{epoch}", 100 + epoch)
    (tmp_path / "best").mkdir()
    deleted = keep_last_n(tmp_path, 2)
    assert sorted(p.name for p in deleted) == ["epoch_0", "step_10", "step_2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "epoch_1", "epoch_2", "step_20", "step_30"]
    with pytest.raises(ValueError):
        keep_last_n(tmp_path, 0)


def test_atomic_writes_get_the_permissions_of_any_new_file(tmp_path):
    # mkstemp/mkdtemp make private 0600/0700 temporaries; the checkpoint must not stay private.
    from ftcore.training.checkpoint_io import _UMASK

    if _UMASK & 0o044:
        pytest.skip(f"umask {_UMASK:o} hides new files from others: private is then the expected mode")
    file = atomic_write_json({"a": 1}, tmp_path / "state.json")
    with atomic_write_dir(tmp_path / "step_1") as folder:
        (folder / "weights.bin").write_bytes(b"x")
    assert file.stat().st_mode & 0o777 == 0o666 & ~_UMASK
    assert (tmp_path / "step_1").stat().st_mode & 0o777 == 0o777 & ~_UMASK


def test_keep_last_n_neither_counts_nor_deletes_incomplete_folders(tmp_path):
    # An incomplete newer folder must not push out the checkpoint a resume continues from.
    for step in (20, 30):
        make_checkpoint(tmp_path, f"step_{step}", step)
    make_checkpoint(tmp_path, "step_40", 40, complete=False)
    make_checkpoint(tmp_path, "step_32", 32)
    deleted = keep_last_n(tmp_path, 2)
    assert [p.name for p in deleted] == ["step_20"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_30", "step_32", "step_40"]
    assert find_latest_checkpoint(tmp_path).name == "step_32"


def test_find_latest_checkpoint_uses_recorded_step_and_skips_incomplete(tmp_path):
    assert find_latest_checkpoint(tmp_path) is None
    make_checkpoint(tmp_path, "step_5", 5)
    make_checkpoint(tmp_path, "epoch_0", 8)  # epoch end at global step 8
    make_checkpoint(tmp_path, "step_9", 9, complete=False)  # killed before its state was written
    assert find_latest_checkpoint(tmp_path).name == "epoch_0"
    make_checkpoint(tmp_path, "step_12", 12)
    assert find_latest_checkpoint(tmp_path).name == "step_12"
