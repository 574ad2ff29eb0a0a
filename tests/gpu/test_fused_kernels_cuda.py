"""Fused RMSNorm / SwiGLU / RoPE on CUDA (`pytest -m gpu`); skipped without CUDA.

References: the float64 formulas (kernels at training shapes) and, for a small Llama in bf16, the
same model in float32: the fused bf16 model must be as close to it as the plain bf16 model is.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ftcore.distributed.parallelize import parallelize
from ftcore.kernels import fused_norm, fused_rope, fused_swiglu
from tests.kernels.fused_reference import (
    TOLERANCES,
    grads64,
    loss_and_grads,
    rms_norm64,
    rope64,
    rope_tables,
    swiglu64,
    tiny_models,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
BF16 = TOLERANCES[torch.bfloat16]
# head_dim 64 (8 heads of 512), GQA 2:1, an MLP width that is no multiple of the SwiGLU block
SIZES = dict(vocab_size=1024, dim=512, n_layers=2, n_heads=8, n_kv_heads=4, hidden_dim=1400)


def _randn(*shape, scale=1.0, dtype=torch.bfloat16):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


@pytest.mark.parametrize("weight_grad", [True, False])
def test_rms_norm_on_cuda_at_8b_width(weight_grad):
    x = _randn(2, 1000, 4096, scale=2.0).requires_grad_(True)
    weight = (1 + _randn(4096, scale=0.1, dtype=torch.float32)).bfloat16().requires_grad_(weight_grad)
    y = fused_norm.rms_norm(x, weight, 1e-5)
    torch.testing.assert_close(y.double(), rms_norm64(x, weight, 1e-5), **BF16)
    grad_y = _randn(2, 1000, 4096)
    y.backward(grad_y)
    dx64, dw64 = grads64(rms_norm64, [x, weight], grad_y, 1e-5)
    torch.testing.assert_close(x.grad.double(), dx64, **BF16)
    if weight_grad:  # a sum of 2000 rows, rounded once to bf16
        torch.testing.assert_close(weight.grad.double(), dw64, rtol=1e-2, atol=0.5)


def test_swiglu_on_cuda_at_8b_width():
    gate, up = (
        _randn(2, 1000, 14336, scale=3.0).requires_grad_(True),
        _randn(2, 1000, 14336).requires_grad_(True),
    )
    out = fused_swiglu.swiglu(gate, up)
    torch.testing.assert_close(out.double(), swiglu64(gate, up), **BF16)
    grad = _randn(2, 1000, 14336)
    out.backward(grad)
    d_gate64, d_up64 = grads64(swiglu64, [gate, up], grad)
    torch.testing.assert_close(gate.grad.double(), d_gate64, **BF16)
    torch.testing.assert_close(up.grad.double(), d_up64, **BF16)


@pytest.mark.parametrize("n_heads", [32, 8])
def test_rope_on_cuda_on_transposed_q_and_k(n_heads):
    x = _randn(2, 2048, n_heads, 128).transpose(1, 2).requires_grad_(True)  # (B, H, T, D) view
    cos, sin = (t.cuda() for t in rope_tables(2, 2048, 128, torch.bfloat16))
    out = fused_rope.rope(x, cos, sin)
    assert out.stride() == x.stride()
    torch.testing.assert_close(out.double(), rope64(x, cos, sin), **BF16)
    grad = _randn(2, 2048, n_heads, 128).transpose(1, 2)
    out.backward(grad)
    (dx64,) = grads64(rope64, [x], grad, cos, sin)
    torch.testing.assert_close(x.grad.double(), dx64, **BF16)


def _relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return float((got.float() - reference).norm() / reference.norm().clamp_min(1e-12))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fused_bf16_llama_is_as_close_to_float32_as_the_plain_bf16_one(lora):
    reference, _ = tiny_models(lora, device="cuda", dtype=torch.float32, **SIZES)
    plain = copy.deepcopy(reference).bfloat16()
    fused = parallelize(copy.deepcopy(plain), fused_kernels=True, activation_checkpointing=True)
    tokens = torch.randint(0, SIZES["vocab_size"], (2, 256), device="cuda")
    loss32, grads32 = loss_and_grads(reference, tokens)
    (plain_loss, plain_grads), (fused_loss, fused_grads) = (
        loss_and_grads(plain, tokens),
        loss_and_grads(fused, tokens),
    )
    assert abs(float(fused_loss) - float(loss32)) <= 2 * abs(float(plain_loss) - float(loss32)) + 2e-3
    for name, grad32 in grads32.items():
        plain_error = _relative_error(plain_grads[name], grad32)
        fused_error = _relative_error(fused_grads[name], grad32)
        assert fused_error <= 1.5 * plain_error + 2e-3, (name, fused_error, plain_error)


def test_fused_kernels_compose_with_checkpointing_and_compile_on_cuda():
    _, eager = tiny_models(lora=True, device="cuda", dtype=torch.bfloat16, **SIZES)
    compiled = copy.deepcopy(eager)
    parallelize(eager, fused_kernels=True, activation_checkpointing=True)
    parallelize(compiled, fused_kernels=True, activation_checkpointing=True, compile=True)
    tokens = torch.randint(0, SIZES["vocab_size"], (2, 256), device="cuda")
    (loss, grads), (compiled_loss, compiled_grads) = (
        loss_and_grads(eager, tokens),
        loss_and_grads(compiled, tokens),
    )
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-2, atol=1e-2)
    for name, grad in grads.items():
        assert _relative_error(compiled_grads[name], grad.float()) < 2e-2, name
