"""The fused NF4 matmul, the dequantize variants and the NF4 linear dispatch, on CPU through the Triton
interpreter: the cases in nf4_matmul_interpret_cases.py run in a fresh interpreter with TRITON_INTERPRET=1
(Triton reads it when first imported)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.kernels.interpreter import run_interpreted_cases

pytest.importorskip("triton")

CASES = Path(__file__).with_name("nf4_matmul_interpret_cases.py")


def test_fused_nf4_matmul_and_dequant_variants_under_interpreter():
    run_interpreted_cases(CASES)
