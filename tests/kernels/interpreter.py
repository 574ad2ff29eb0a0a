"""Run a file of Triton kernel cases on CPU through the Triton interpreter, in a fresh process.

Triton reads TRITON_INTERPRET when it is first imported (its own `tl.max` etc. are jit functions), so the
cases cannot run in this test process, which may have imported Triton already."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_interpreted_cases(cases: Path, timeout_s: int = 300) -> None:
    """Every case in `cases` must pass and none may skip (a skip would hide an untested kernel)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(cases),
        "-p",
        "no:cacheprovider",
        "-W",
        "ignore::RuntimeWarning",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
