"""NF4 reference against independent facts: the QLoRA construction, bitsandbytes' source constants, brute force."""

from __future__ import annotations

import pytest
import torch

from ftcore.kernels import nf4_reference as ref

# The 15 decision-tree constants of bitsandbytes' dQuantizeNF4 (csrc/kernels.cu), in ascending order.
BNB_NF4_TREE_THRESHOLDS = [
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
]  # fmt: skip


def qlora_nf4_values() -> torch.Tensor:
    """QLoRA appendix: 8 positive quantiles of N(0,1) from offset 0.9677083 down to 0.5, 7 negative ones, an exact 0."""
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]).sort().values
    return values / values.max()


def test_code_table_is_the_qlora_construction():
    assert torch.allclose(ref.nf4_code().double(), qlora_nf4_values(), atol=1e-6, rtol=0)
    assert ref.nf4_code()[7] == 0 and ref.nf4_code()[0] == -1 and ref.nf4_code()[15] == 1


def test_thresholds_are_bitsandbytes_tree_constants():
    assert torch.equal(ref.nf4_thresholds(), torch.tensor(BNB_NF4_TREE_THRESHOLDS, dtype=torch.float32))


def test_packing_first_element_in_high_nibble():
    w = ref.nf4_code().repeat(4)  # one block of 64 with absmax 1: element i has code i % 16
    parts = ref.quantize_nf4(w, double_quant=False)
    assert parts.packed[:8].tolist() == [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF]
    assert torch.equal(ref.dequantize_nf4(parts, torch.float32), w)


def test_midpoint_ties_go_to_the_lower_code():
    t = ref.nf4_thresholds()
    just_above = torch.nextafter(t, torch.full_like(t, 2.0))
    assert ref.nf4_code_index(t).tolist() == list(range(15))
    assert ref.nf4_code_index(just_above).tolist() == list(range(1, 16))


def test_rounding_is_nearest_code_like_brute_force():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    parts = ref.quantize_nf4(w, double_quant=False)
    blocks = w.view(-1, 64)
    scaled = blocks * torch.reciprocal(blocks.abs().amax(1))[:, None]
    brute = (scaled.unsqueeze(-1) - ref.nf4_code()).abs().argmin(-1).view(-1)
    assert torch.equal(ref.unpack_nibbles(parts.packed).long(), brute)


def test_dynamic_map_facts():
    code = ref.dynamic_map()
    assert code.shape == (256,) and code.dtype == torch.float32
    assert torch.all(code[1:] > code[:-1])  # sorted, no duplicate
    assert code[-1] == 1.0 and (code == 0).sum() == 1
    # Independent float64 construction: mean of neighbouring points of linspace(0.1, 1, 2**i + 1) * 10**(i-6).
    expected = [0.0, 1.0]
    for i in range(7):
        b = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float64)
        m = ((b[:-1] + b[1:]) / 2 * 10.0 ** (i - 6)).tolist()
        expected += m + [-v for v in m]
    assert torch.allclose(
        code.double(), torch.tensor(sorted(expected), dtype=torch.float64), rtol=1e-6, atol=0
    )


def test_gaussian_round_trip_error_and_bits_per_weight():
    torch.manual_seed(0)
    w = torch.randn(512, 1024, dtype=torch.bfloat16)
    parts = ref.quantize_nf4(w)
    assert parts.packed.dtype == torch.uint8 and parts.absmax.dtype == torch.uint8
    assert ref.nf4_storage_bits_per_weight(parts) == pytest.approx(4.127, abs=1e-3)
    blocks = w.float().view(-1, 64)
    absmax = blocks.abs().amax(1)
    assert ((ref.dequantize_absmax(parts) - absmax).abs() / absmax).max() < 0.01  # 8-bit absmax: < 1%
    error = (ref.dequantize_nf4(parts, torch.float32).view(-1, 64) - blocks).abs() / absmax[:, None]
    assert 0.02 < error.mean() < 0.035  # ~0.028 for N(0,1) blocks of 64
    widest_half_gap = (1.0 - ref.NF4_CODE_VALUES[14]) / 2
    assert error.max() < widest_half_gap + 0.02  # + absmax error and bf16 input rounding


def test_zero_block_and_partial_nested_block():
    w = torch.randn(3, 64 * 5)  # 15 blocks: one partial 256-block for the nested scales
    w[1] = 0
    parts = ref.quantize_nf4(w)
    assert parts.nested_absmax.shape == (1,)
    # An all-zero block gets code 0 (bitsandbytes: 0 * inf is NaN, which fails every compare); exact
    # zeros come back without double quant, and within the 8-bit absmax error with it.
    assert torch.equal(ref.dequantize_nf4(ref.quantize_nf4(w, double_quant=False))[1], torch.zeros(320))
    out = ref.dequantize_nf4(parts, torch.float32)
    assert out[1].abs().max() < 0.01 * w.abs().max()
    assert ref.unpack_nibbles(parts.packed).view(3, -1)[1].eq(0).all()


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of the block size"):
        ref.quantize_nf4(torch.randn(3, 10))
    with pytest.raises(ValueError, match="floating-point"):
        ref.quantize_nf4(torch.ones(64, dtype=torch.int32))


def test_dispatch_dequantize_into_out_on_cpu():
    from ftcore import kernels

    parts = ref.quantize_nf4(torch.randn(16, 128))
    out = torch.full((16, 128), float("nan"), dtype=torch.bfloat16)
    assert kernels.dequantize_nf4(parts, torch.bfloat16, out=out) is out
    assert torch.equal(out, ref.dequantize_nf4(parts, torch.bfloat16))


def test_the_8bit_code_search_in_slices_equals_one_search():
    # quantize_blockwise_8bit searches the dynamic code in slices of 2**18 values (memory while loading)
    torch.manual_seed(0)
    x = torch.randn(2**18 * 2 + 4096) * torch.linspace(0.01, 3.0, 2**18 * 2 + 4096)
    codes, absmax = ref.quantize_blockwise_8bit(x)
    scaled = x.view(-1, ref.NESTED_BLOCK_SIZE) * torch.reciprocal(absmax)[:, None]
    assert torch.equal(codes, ref._dynamic_code_index(scaled.view(-1), ref.dynamic_map()))
