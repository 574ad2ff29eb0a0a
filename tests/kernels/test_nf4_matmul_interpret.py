"""The fused NF4 matmul, the dequantize variants and the NF4 linear dispatch, on CPU through the Triton
interpreter: the cases in nf4_matmul_interpret_cases.py run in a fresh interpreter with TRITON_INTERPRET=1
(Triton reads it when first imported)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

CASES = Path(__file__).with_name("nf4_matmul_interpret_cases.py")


def test_fused_nf4_matmul_and_dequant_variants_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(CASES),
        "-p",
        "no:cacheprovider",
        "-W",
        "ignore::RuntimeWarning",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
