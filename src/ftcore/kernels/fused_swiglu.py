"""SwiGLU's elementwise part as one kernel forward and one backward: `swiglu(gate, up) = silu(gate) * up`.

Eager PyTorch runs silu and the product as two kernels and autograd keeps gate, silu(gate) and up;
here autograd keeps gate and up only (the MLP's two projections' outputs) and the backward recomputes
the sigmoid in float32. Forward numerics are those of `F.silu(gate) * up` in the inputs' dtype: silu
in float32 rounded to the dtype, then the product rounded. Backward, with s = sigmoid(gate):
    d_up = grad * gate * s        d_gate = grad * up * s * (1 + gate * (1 - s))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ftcore.kernels.eager_twin import eager_twin
from ftcore.kernels.fused_common import jit, tl, use_triton

BLOCK = 1024  # elements per program
NUM_WARPS = 4


@jit
def _forward_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    silu = (gate * tl.sigmoid(gate)).to(gate_ptr.dtype.element_ty).to(tl.float32)  # F.silu's rounding
    tl.store(out_ptr + offsets, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


@jit
def _backward_kernel(grad_ptr, gate_ptr, up_ptr, d_gate_ptr, d_up_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    tl.store(d_up_ptr + offsets, (grad * gate * sig).to(d_up_ptr.dtype.element_ty), mask=mask)
    d_gate = grad * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(d_gate_ptr + offsets, d_gate.to(d_gate_ptr.dtype.element_ty), mask=mask)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def swiglu_backward_reference(grad, gate, up) -> tuple[torch.Tensor, torch.Tensor]:
    grad_f, gate_f, up_f = grad.float(), gate.float(), up.float()
    sig = torch.sigmoid(gate_f)
    d_gate = grad_f * up_f * sig * (1 + gate_f * (1 - sig))
    return d_gate.to(gate.dtype), (grad_f * gate_f * sig).to(up.dtype)


def _check_shapes(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            f"swiglu needs gate and up of one shape and dtype, got {tuple(gate.shape)} {gate.dtype} and "
            f"{tuple(up.shape)} {up.dtype}; the MLP's w1 and w3 must have the same output size and dtype"
        )


def _launch(kernel, *tensors: torch.Tensor) -> None:
    n = tensors[0].numel()
    if n:
        kernel[(-(-n // BLOCK),)](*tensors, n, BLOCK=BLOCK, num_warps=NUM_WARPS)


def _swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, contiguous, in the inputs' dtype."""
    if not use_triton(gate):
        return swiglu_reference(gate, up).contiguous()
    gate, up = gate.contiguous(), up.contiguous()  # no-ops for the projections' outputs
    out = torch.empty_like(gate)
    _launch(_forward_kernel, gate, up, out)
    return out


_swiglu_op = torch.library.custom_op("ftcore::swiglu", mutates_args=())(_swiglu_forward)


@_swiglu_op.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("ftcore::swiglu_backward", mutates_args=())
def _swiglu_backward_op(
    grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (d_gate, d_up), contiguous, in the inputs' dtype."""
    if not use_triton(gate):
        d_gate, d_up = swiglu_backward_reference(grad, gate, up)
        return d_gate.contiguous(), d_up.contiguous()
    grad, gate, up = grad.contiguous(), gate.contiguous(), up.contiguous()
    d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
    _launch(_backward_kernel, grad, gate, up, d_gate, d_up)
    return d_gate, d_up


@_swiglu_backward_op.register_fake
def _(grad, gate, up):
    return (
        torch.empty_like(gate, memory_format=torch.contiguous_format),
        torch.empty_like(up, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)  # gate and up only: silu(gate) is recomputed in the backward kernel


def _backward(ctx, grad):
    gate, up = ctx.saved_tensors
    return _swiglu_backward_op(grad, gate, up)


_swiglu_op.register_autograd(_backward, setup_context=_setup_context)
_swiglu = eager_twin(_swiglu_op, _swiglu_forward, _setup_context, _backward)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate, up of one shape (..., hidden) and dtype."""
    _check_shapes(gate, up)
    return _swiglu(gate, up)
