"""Cases run by test_fused_kernels.py in a subprocess with TRITON_INTERPRET=1 (set before triton is imported).

The Triton RMSNorm / SwiGLU / RoPE kernels, forward and backward, on CPU tensors through the interpreter,
against the float64 formulas; then a tiny Llama with the fused forwards against the plain one. Every
case first disables the PyTorch reference path, so a pass means the Triton kernels ran.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run through test_fused_kernels.py (needs TRITON_INTERPRET=1)", allow_module_level=True)

from ftcore.kernels import fused_norm, fused_rope, fused_swiglu  # noqa: E402
from tests.kernels.fused_reference import (  # noqa: E402
    TOLERANCES,
    compare_fused_model,
    grads64,
    rms_norm64,
    rope64,
    rope_tables,
    swiglu64,
)

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def no_reference_path(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the PyTorch reference ran instead of the Triton kernel")

    for module, names in [
        (fused_norm, ["rms_norm_reference", "rms_norm_backward_reference"]),
        (fused_swiglu, ["swiglu_reference", "swiglu_backward_reference"]),
        (fused_rope, ["rope_reference"]),
    ]:
        for name in names:
            monkeypatch.setattr(module, name, fail)


def _randn(*shape, dtype, seed, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 100), (3, 5, 64), (1, 8)])
@pytest.mark.parametrize("weight_grad", [True, False], ids=["trained_weight", "frozen_weight"])
def test_rms_norm_forward_and_backward(dtype, shape, weight_grad):
    # 37 rows over 4 programs (10, 10, 10, 7 rows); 100 columns in a 128 block
    x = _randn(*shape, dtype=dtype, seed=0, scale=2.0).requires_grad_(True)
    weight = (1 + _randn(shape[-1], dtype=torch.float32, seed=1, scale=0.1)).to(dtype)
    weight.requires_grad_(weight_grad)
    y = fused_norm.rms_norm(x, weight, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), rms_norm64(x, weight, 1e-5), **TOLERANCES[dtype])
    grad_y = _randn(*shape, dtype=dtype, seed=2)
    y.backward(grad_y)
    dx64, dw64 = grads64(rms_norm64, [x, weight], grad_y, 1e-5)
    torch.testing.assert_close(x.grad.double(), dx64, **TOLERANCES[dtype])
    if weight_grad:
        scale = grad_y.shape[0] if len(shape) == 2 else 1  # a sum over rows: its error grows with them
        torch.testing.assert_close(weight.grad.double(), dw64, rtol=TOLERANCES[dtype]["rtol"],
                                   atol=TOLERANCES[dtype]["atol"] * scale)  # fmt: skip
    else:
        assert weight.grad is None


def test_rms_norm_float32_weight_on_bfloat16_input_promotes():
    x = _randn(6, 48, dtype=torch.bfloat16, seed=3)
    weight = 1 + _randn(48, dtype=torch.float32, seed=4, scale=0.1)
    y = fused_norm.rms_norm(x, weight, 1e-6)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), rms_norm64(x, weight, 1e-6), **TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 171), (2048,), (1, 1)])  # 3591: not a multiple of the block
def test_swiglu_forward_and_backward(dtype, shape):
    gate = _randn(*shape, dtype=dtype, seed=5, scale=3.0).requires_grad_(True)
    up = _randn(*shape, dtype=dtype, seed=6).requires_grad_(True)
    out = fused_swiglu.swiglu(gate, up)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), swiglu64(gate, up), **TOLERANCES[dtype])
    grad = _randn(*shape, dtype=dtype, seed=7)
    out.backward(grad)
    d_gate64, d_up64 = grads64(swiglu64, [gate, up], grad)
    torch.testing.assert_close(gate.grad.double(), d_gate64, **TOLERANCES[dtype])
    torch.testing.assert_close(up.grad.double(), d_up64, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [8, 64])
@pytest.mark.parametrize("n_heads,cos_batch", [(3, 2), (8, 1)], ids=["3heads", "8heads_shared_angles"])
def test_rope_on_transposed_views_forward_and_backward(dtype, head_dim, n_heads, cos_batch):
    batch, seq_len = 2, 5
    # q as the attention makes it: a (B, n_heads, T, head_dim) view of a (B, T, n_heads, head_dim) projection
    x = _randn(batch, seq_len, n_heads, head_dim, dtype=dtype, seed=8).transpose(1, 2).requires_grad_(True)
    cos, sin = rope_tables(cos_batch, seq_len, head_dim, dtype)
    out = fused_rope.rope(x, cos, sin)
    assert out.stride() == x.stride()  # written in x's layout, no copy to contiguous
    torch.testing.assert_close(out.double(), rope64(x, cos, sin), **TOLERANCES[dtype])
    grad = _randn(batch, n_heads, seq_len, head_dim, dtype=dtype, seed=9)  # a contiguous gradient
    out.backward(grad)
    (dx64,) = grads64(rope64, [x], grad, cos, sin)
    torch.testing.assert_close(x.grad.double(), dx64, **TOLERANCES[dtype])


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("activation_checkpointing", [False, True], ids=["no_ac", "ac"])
def test_tiny_llama_fused_matches_plain(lora, activation_checkpointing):
    (loss, grads), (fused_loss, fused_grads) = compare_fused_model(lora, activation_checkpointing)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
