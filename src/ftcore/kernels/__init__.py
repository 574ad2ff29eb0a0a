"""Kernels: NF4 quantize / dequantize / linear, dispatched to Triton on CUDA and to the reference elsewhere."""

from __future__ import annotations

import torch

from ftcore.kernels import nf4_reference
from ftcore.kernels.nf4_reference import NF4Parts

try:  # Triton is optional on CPU-only installs; the reference covers every device.
    from ftcore.kernels import nf4_triton
except ImportError:  # pragma: no cover - depends on the install
    nf4_triton = None

__all__ = ["NF4Parts", "quantize_nf4", "dequantize_nf4", "nf4_linear", "use_triton"]


def use_triton(device: torch.device) -> bool:
    return nf4_triton is not None and device.type == "cuda"


def quantize_nf4(w: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Parts:
    impl = nf4_triton if use_triton(w.device) else nf4_reference
    return impl.quantize_nf4(w, block_size=block_size, double_quant=double_quant)


def dequantize_nf4(
    parts: NF4Parts, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """NF4 -> float; on CUDA one Triton launch (into `out` when given), elsewhere the reference."""
    if use_triton(parts.packed.device):
        return nf4_triton.dequantize_nf4(parts, dtype, out)
    weight = nf4_reference.dequantize_nf4(parts, dtype)
    return weight if out is None else out.copy_(weight.view_as(out))


class _NF4Linear(torch.autograd.Function):
    """y = x @ W^T (+ b), W frozen in NF4: no weight gradient; W is dequantized again for backward.

    Recomputing W (a memory-bound kernel) instead of saving its bf16 copy keeps the saved activations
    at the size of x, which is what lets QLoRA fit a large model on one GPU.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, parts: NF4Parts, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.parts = parts
        ctx.bias_needs_grad = bias is not None and bias.requires_grad
        return torch.nn.functional.linear(x, dequantize_nf4(parts, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        grad_x = grad_y @ dequantize_nf4(ctx.parts, grad_y.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if ctx.bias_needs_grad else None
        return grad_x, None, grad_bias


def nf4_linear(x: torch.Tensor, parts: NF4Parts, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ dequantize(parts)^T (out, in) + bias, differentiable w.r.t. x (and bias) only."""
    return _NF4Linear.apply(x, parts, bias)
