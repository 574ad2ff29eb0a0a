"""NF4Linear / NF4Weight: QLoRA input gradients vs an fp32 dequantized reference, load hook, state dict modes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ftcore.kernels import nf4_bnb
from ftcore.kernels import nf4_reference as ref
from ftcore.modules.nf4 import NF4Linear, NF4Weight, nf4_linear, nf4_state_dict_mode, random_nf4, to_nf4


def test_input_gradient_matches_fp32_dequantized_linear():
    torch.manual_seed(0)
    w, b = torch.randn(48, 128), torch.randn(48)
    w_nf4 = to_nf4(w)
    assert isinstance(w_nf4, NF4Weight) and w_nf4.absmax.dtype == torch.uint8
    x = torch.randn(2, 5, 128, requires_grad=True)
    bias = b.clone().requires_grad_(True)
    grad_out = torch.randn(2, 5, 48)
    nf4_linear(x, w_nf4, bias).backward(grad_out)
    # Independent path: plain torch linear on the fp32 dequantized weight.
    w_deq = ref.dequantize_nf4(ref.quantize_nf4(w), torch.float32)
    x_ref, bias_ref = x.detach().clone().requires_grad_(True), b.clone().requires_grad_(True)
    nn.functional.linear(x_ref, w_deq, bias_ref).backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, bias_ref.grad, rtol=1e-5, atol=1e-5)


def test_load_quantizes_float_weight_and_state_dict_is_bf16():
    torch.manual_seed(0)
    dense = nn.Linear(128, 64, bias=True)
    with torch.device("meta"):
        layer = NF4Linear(128, 64, bias=True)
    layer.to_empty(device="cpu")
    layer.load_state_dict(dense.state_dict())  # strict: every key accounted for
    expected = ref.dequantize_nf4(ref.quantize_nf4(dense.weight.detach()), torch.bfloat16)
    state = layer.state_dict()
    assert set(state) == {"weight", "bias"} and state["weight"].dtype == torch.bfloat16
    assert torch.equal(state["weight"], expected)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, expected, dense.bias.detach().bfloat16()))


def test_nf4_state_dict_mode_round_trip():
    layer = NF4Linear(64, 32)
    layer.load_state_dict({"weight": torch.randn(32, 64)})
    with nf4_state_dict_mode("nf4"):
        packed_state = layer.state_dict()
    assert packed_state["weight_packed"].dtype == torch.uint8 and packed_state["weight_packed"].shape == (
        32,
        32,
    )
    other = NF4Linear(64, 32)
    other.load_state_dict(packed_state)
    assert torch.equal(other.state_dict()["weight"], layer.state_dict()["weight"])
    layer.state_dict_mode = "nf4"
    assert "weight_absmax" in layer.state_dict()
    with pytest.raises(ValueError, match="nf4_state_dict_mode"):
        with nf4_state_dict_mode("int4"):
            pass


def test_loads_a_bnb_4bit_checkpoint_entry_set():
    w = torch.randn(32, 128, dtype=torch.bfloat16)
    entries = nf4_bnb.to_bnb_4bit_state("weight", ref.quantize_nf4(w))
    layer = NF4Linear(128, 32)
    layer.load_state_dict(entries)
    assert torch.equal(layer.state_dict()["weight"], ref.dequantize_nf4(ref.quantize_nf4(w)))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="in_dim divisible by 64"):
        NF4Linear(100, 8)
    with pytest.raises(ValueError, match="expects weight"):
        NF4Linear(64, 8).load_state_dict({"weight": torch.randn(8, 128)})


def _same_parts(a, b) -> bool:
    tensors = ("packed", "absmax", "nested_absmax", "offset")
    return all(torch.equal(getattr(a, t), getattr(b, t)) for t in tensors) and a.shape == b.shape


@pytest.mark.parametrize("chunk_weights", [64, 128 * 3, 128 * 40, 10**9])
def test_chunked_quantization_gives_the_whole_tensor_bytes(chunk_weights):
    # Blocks quantize independently; the double quantization must still see the whole absmax vector.
    torch.manual_seed(0)
    w = torch.randn(37, 128, dtype=torch.bfloat16) * torch.linspace(0.1, 3, 37)[:, None].bfloat16()
    whole = ref.quantize_nf4(w)
    chunked = to_nf4(w, chunk_weights=chunk_weights)
    assert _same_parts(chunked, whole) and chunked.dtype == torch.bfloat16


def test_weights_whose_rows_are_not_whole_blocks_quantize_as_one_chunk():
    w = torch.randn(4, 96)  # a row holds 1.5 blocks: slicing rows would split a block
    assert _same_parts(to_nf4(w, chunk_weights=96), ref.quantize_nf4(w))


def test_random_nf4_draws_normal_weights_of_the_asked_shape():
    torch.manual_seed(0)
    parts = random_nf4(300, 256, std=0.02, device="cpu", chunk_weights=256 * 7)  # 43 chunks, the last short
    weight = parts.dequantize(torch.float32)
    assert weight.shape == (300, 256) and parts.packed.numel() == 300 * 128
    assert abs(weight.std().item() - 0.02) < 0.002 and abs(weight.mean().item()) < 0.001
    assert not torch.equal(weight[:7], weight[7:14])  # every chunk draws fresh numbers
