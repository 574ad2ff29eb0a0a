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


@pytest.mark.parametrize("elements_per_program,num_warps", [(64, 1), (1024, 4), (8192, 8)])
@pytest.mark.parametrize("block_size", [64, 128])
def test_dequantize_tiling_never_changes_values(elements_per_program, num_warps, block_size):
    # 120 or 60 blocks: one partial program (8192), a partial last program (1024), one block each (64).
    torch.manual_seed(1)
    w = torch.randn(40, 192, dtype=torch.bfloat16) * 0.02
    parts = ref.quantize_nf4(w, block_size=block_size)
    expected = ref.dequantize_nf4(parts)
    got = tri.dequantize_nf4(parts, elements_per_program=elements_per_program, num_warps=num_warps)
    assert torch.equal(got, expected)


def test_dequantize_into_preallocated_out_and_rejects_a_wrong_one():
    parts = ref.quantize_nf4(torch.randn(8, 128))
    out = torch.full((8, 128), float("nan"), dtype=torch.bfloat16)
    assert tri.dequantize_nf4(parts, out=out) is out
    assert torch.equal(out, ref.dequantize_nf4(parts, torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous tensor of 1024 elements"):
        tri.dequantize_nf4(parts, out=torch.empty(128, 16).t())
    odd_rows = ref.quantize_nf4(torch.randn(64, 3))  # an odd last dim still pairs up in the flat buffer
    assert torch.equal(
        tri.dequantize_nf4(odd_rows, torch.float16), ref.dequantize_nf4(odd_rows, torch.float16)
    )


def test_dequantize_builds_no_tables_per_call(monkeypatch):
    # A per-call host->device copy of the code tables blocks the host on CUDA; they must be built once.
    parts = ref.quantize_nf4(torch.randn(4, 64))
    expected = ref.dequantize_nf4(parts)
    tri.dequantize_nf4(parts)

    def fail(*args, **kwargs):
        raise AssertionError("code table rebuilt on a dequantize call")

    for name in ("nf4_code", "nf4_thresholds", "dynamic_map"):
        monkeypatch.setattr(ref, name, fail)
    assert torch.equal(tri.dequantize_nf4(parts), expected)


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
