"""A LoRA layer's forward and backward as one autograd node, so its input gradient is ONE GEMM's output.

Built from separate ops, a LoRA layer's input `x` has two consumers, the base GEMM and the adapter's
`A`, so autograd computes `grad @ W` and `(s grad @ B) @ A` and then adds them: one more pass over a
(tokens, in) tensor per adapter, 7 per Llama block (an 8B LoRA step spends ~9 ms of ~360 on them,
profiled on an H200). Here the adapter's small product is computed first and the base GEMM adds into
it in its epilogue (`addmm_`, beta = 1), so the sum costs no extra kernel.

    forward:  out = x W^T;  h = x A^T;  out += s h B^T        (as LoRALinear's unfused path)
    backward: g_h = s g B;  dB = s g^T h;  dA = g_h^T x;  dx = g_h A + g W

The base W is either a float weight (frozen) or NF4 parts, dequantized again in the backward as
`ftcore::nf4_linear_grad_input` does. Eager only: under torch.compile, Inductor sees the plain ops
(its own fusion applies) and the NF4 custom operators stay opaque.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # at run time only a QLoRA base needs the NF4 code (imported where it is used)
    from ftcore.kernels.nf4_reference import NF4Parts


class _LoRAMatmul(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x, lora_a, lora_b, scale, weight, packed, absmax, nested_absmax, offset, nf4_meta, output_read
    ):
        hidden = torch.mm(x, lora_a.t())  # (tokens, rank)
        if not output_read:  # a recompute that discards it (ftcore.modules.recompute): saves only
            out_dim = nf4_meta[0][0] if weight is None else weight.shape[0]
            out = x.new_empty(x.shape[0], out_dim)
        else:
            if weight is None:
                out = _NF4Base(packed, absmax, nested_absmax, offset, nf4_meta).linear(x)
            else:
                out = torch.mm(x, weight.t())
            out.addmm_(hidden, lora_b.t(), alpha=scale)
        ctx.save_for_backward(x, lora_a, lora_b, hidden, weight, packed, absmax, nested_absmax, offset)
        ctx.scale, ctx.nf4_meta = scale, nf4_meta
        return out

    @staticmethod
    def backward(ctx, grad):
        x, lora_a, lora_b, hidden, weight, packed, absmax, nested_absmax, offset = ctx.saved_tensors
        needs_x, needs_a, needs_b = ctx.needs_input_grad[:3]
        grad = grad.contiguous()
        grad_hidden = torch.mm(grad, lora_b).mul_(ctx.scale)  # (tokens, rank)
        # in the parameters' own (row-major) layout, so AccumulateGrad takes them without a copy
        grad_b = torch.mm(grad.t(), hidden).mul_(ctx.scale) if needs_b else None
        grad_a = torch.mm(grad_hidden.t(), x) if needs_a else None
        grad_x = None
        if needs_x:
            if weight is None:
                weight = _NF4Base(packed, absmax, nested_absmax, offset, ctx.nf4_meta).dequantize(grad.dtype)
            grad_x = torch.mm(grad_hidden, lora_a).addmm_(grad, weight)  # (tokens, in), one pass
        return grad_x, grad_a, grad_b, None, None, None, None, None, None, None, None


class _NF4Base:
    """The NF4 parts as the autograd node holds them: tensors saved, shape and block size as metadata."""

    def __init__(self, packed, absmax, nested_absmax, offset, meta: tuple[torch.Size, int]):
        self.tensors, self.meta = (packed, absmax, nested_absmax, offset), meta

    def parts(self, dtype: torch.dtype) -> NF4Parts:
        from ftcore.kernels.nf4_reference import NF4Parts

        packed, absmax, nested_absmax, offset = self.tensors
        shape, block_size = self.meta
        return NF4Parts(packed, absmax, nested_absmax, offset, shape, dtype, block_size)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        from ftcore import kernels

        return kernels.nf4_linear(x, self.parts(x.dtype))

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        from ftcore import kernels

        return kernels.dequantize_nf4(self.parts(dtype), dtype)


def lora_matmul(
    x: torch.Tensor,
    base: torch.Tensor | NF4Parts,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    output_read: bool = True,
) -> torch.Tensor:
    """x (tokens, in) @ base^T + scale * (x @ lora_a^T) @ lora_b^T -> (tokens, out); base is frozen.

    `base` is a float (out, in) weight or NF4 parts of one. Gradients flow to x, lora_a and lora_b.
    `output_read=False` (a checkpoint recompute that discards the result) saves what the backward
    needs and returns an uninitialized output, without the base and adapter GEMMs."""
    if isinstance(base, torch.Tensor):
        return _LoRAMatmul.apply(x, lora_a, lora_b, scale, base, None, None, None, None, None, output_read)
    meta = (base.shape, base.block_size)
    parts = (base.packed, base.absmax, base.nested_absmax, base.offset)
    return _LoRAMatmul.apply(x, lora_a, lora_b, scale, None, *parts, meta, output_read)
