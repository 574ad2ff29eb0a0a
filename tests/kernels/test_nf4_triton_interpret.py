"""Triton NF4 kernels == the reference bit for bit, on CPU through the Triton interpreter.

Triton reads TRITON_INTERPRET when it is first imported (its own `tl.max` etc. are jit functions), so
the cases in nf4_triton_interpret_cases.py run in a fresh interpreter with the variable set.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.kernels.interpreter import run_interpreted_cases

pytest.importorskip("triton")

CASES = Path(__file__).with_name("nf4_triton_interpret_cases.py")


def test_triton_kernels_match_reference_under_interpreter():
    run_interpreted_cases(CASES)
