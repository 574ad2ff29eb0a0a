"""Cases run by test_nf4_triton_interpret.py in a subprocess with TRITON_INTERPRET=1 (set before triton is imported).

Triton == reference bit for bit, on CPU tensors through the Triton interpreter.
"""

from __future__ import annotations

import os

import pytest
import torch

from ftcore.kernels import nf4_reference as ref

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "run through test_nf4_triton_interpret.py (needs TRITON_INTERPRET=1)", allow_module_level=True
    )

from ftcore.kernels import nf4_triton as tri  # noqa: E402


def assert_parts_equal(a: ref.NF4Parts, b: ref.NF4Parts) -> None:
    assert torch.equal(a.packed, b.packed) and torch.equal(a.absmax, b.absmax)
    assert (a.nested_absmax is None) == (b.nested_absmax is None)
    if a.double_quant:
        assert torch.equal(a.nested_absmax, b.nested_absmax) and torch.equal(a.offset, b.offset)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_and_dequantize_bit_identical(dtype):
    torch.manual_seed(0)
    w = (torch.randn(40, 192) * 0.02).to(dtype)  # 120 blocks: partial program tile and partial 256-block
    w[5, :64] = 0  # an all-zero block
    w[7, 3] = 1.0  # an outlier
    parts = ref.quantize_nf4(w)
    assert_parts_equal(parts, tri.quantize_nf4(w))
    assert torch.equal(tri.dequantize_nf4(parts), ref.dequantize_nf4(parts))
    assert torch.equal(tri.dequantize_nf4(parts, torch.float32), ref.dequantize_nf4(parts, torch.float32))


def test_without_double_quant():
    w = torch.randn(16, 128, dtype=torch.bfloat16)
    parts = ref.quantize_nf4(w, double_quant=False)
    assert_parts_equal(parts, tri.quantize_nf4(w, double_quant=False))
    assert torch.equal(tri.dequantize_nf4(parts), ref.dequantize_nf4(parts))


def test_values_on_midpoints_bit_identical():
    # Scaled values exactly on / just past the midpoints: the compares must agree, not just be close.
    t = ref.nf4_thresholds()
    row = torch.cat([t, torch.nextafter(t, torch.full_like(t, 2.0)), torch.tensor([1.0, -1.0, 0.0, 0.5])])
    w = torch.cat([row, row.flip(0)])[:64].repeat(4, 1)  # (4, 64), absmax 1 per block
    assert torch.equal(tri.quantize_nf4(w).packed, ref.quantize_nf4(w).packed)
