"""RMSNorm as one kernel forward and one backward: `rms_norm(x, weight, eps)`.

Same numerics as `RMSNorm.forward` (models/transformer.py): statistics in float32, the normed row
rounded to x's dtype, then times the weight (the output has the promoted dtype of x and weight). Eager
PyTorch spends ~6 kernels on that, each reading or writing a full float32 activation; here the forward
reads x once and writes y plus one float32 rstd per row, and autograd keeps only x and rstd.

Backward, with x_hat = x * rstd and g = grad_y * weight (all float32):
    dx = rstd * (g - x_hat * mean(g * x_hat))      dweight = sum over rows of grad_y * x_hat
The weight gradient is skipped when the weight is frozen (LoRA): each program then handles one row;
otherwise each program accumulates its rows' share in float32 and the partial rows are summed after.
"""

from __future__ import annotations

import torch

from ftcore.kernels.eager_twin import eager_twin
from ftcore.kernels.fused_common import jit, next_power_of_2, num_warps_for, tl, use_triton


@jit
def _forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, x_row_stride, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # RMSNorm's normed.to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * n_cols + cols, (w * normed).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@jit
def _backward_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, dy_row_stride, x_row_stride,
    n_rows, n_cols, rows_per_program, BLOCK: tl.constexpr, COMPUTE_DW: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    for row in range(first, tl.minimum(first + rows_per_program, n_rows)):
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        x_hat = x * rstd
        g = dy * w
        dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=0) / n_cols))
        tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw += dy * x_hat.to(x_ptr.dtype.element_ty).to(tl.float32)
    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid * n_cols + cols, dw, mask=mask)


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """(..., N) -> (rows, N) with unit column stride (a view whenever possible)."""
    rows = t.reshape(-1, n_cols)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _out_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, weight.dtype)


def rms_norm_reference(x, weight, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm.forward's formula, plus the (...) float32 rstd."""
    x_fp32 = x.float()
    rstd = torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x_fp32 * rstd).to(x.dtype), rstd.squeeze(-1)


def rms_norm_backward_reference(grad_y, x, weight, rstd, compute_dw: bool):
    x_hat = x.float() * rstd[..., None]
    g = grad_y.float() * weight.float()
    dx = rstd[..., None] * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))
    if not compute_dw:
        return dx.to(x.dtype), weight.new_empty(0)
    dw = (grad_y.float() * x_hat.to(x.dtype).float()).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


def _dw_programs(x: torch.Tensor, n_rows: int) -> int:
    # A few programs per SM keep the float32 partial rows (programs x N) small; the CPU interpreter
    # gets 4 so that the tests see several rows per program and a short last one.
    per_device = torch.cuda.get_device_properties(x.device).multi_processor_count * 4 if x.is_cuda else 4
    return max(min(n_rows, per_device), 1)


def _forward_triton(x, weight, eps: float):
    n_cols = x.shape[-1]
    x_rows = _rows(x, n_cols)
    y = torch.empty(x_rows.shape, dtype=_out_dtype(x, weight), device=x.device)
    rstd = torch.empty(x_rows.shape[0], dtype=torch.float32, device=x.device)
    block = next_power_of_2(n_cols)
    if x_rows.shape[0]:
        _forward_kernel[(x_rows.shape[0],)](
            x_rows,
            weight,
            y,
            rstd,
            x_rows.stride(0),
            n_cols,
            eps,
            BLOCK=block,
            num_warps=num_warps_for(block),
        )
    return y.view(x.shape), rstd.view(x.shape[:-1])


def _backward_triton(grad_y, x, weight, rstd, compute_dw: bool):
    n_cols = x.shape[-1]
    x_rows, dy_rows = _rows(x, n_cols), _rows(grad_y, n_cols)
    n_rows = x_rows.shape[0]
    dx = torch.empty(x_rows.shape, dtype=x.dtype, device=x.device)
    programs = _dw_programs(x, n_rows) if compute_dw else max(n_rows, 1)
    rows_per_program = -(-n_rows // programs)
    dw_partial = torch.zeros((programs, n_cols) if compute_dw else (1,), dtype=torch.float32, device=x.device)
    block = next_power_of_2(n_cols)
    if n_rows:
        _backward_kernel[(programs,)](
            dy_rows, x_rows, weight, rstd.reshape(-1), dx, dw_partial, dy_rows.stride(0), x_rows.stride(0),
            n_rows, n_cols, rows_per_program, BLOCK=block, COMPUTE_DW=compute_dw, num_warps=num_warps_for(block),
        )  # fmt: skip
    dw = dw_partial.sum(0).to(weight.dtype) if compute_dw else weight.new_empty(0)
    return dx.view(x.shape), dw


def _rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (y (..., N) in the promoted dtype of x and weight, rstd (...) float32)."""
    if use_triton(x):
        return _forward_triton(x, weight, eps)
    y, rstd = rms_norm_reference(x, weight, eps)
    return y.contiguous(), rstd.contiguous()


_rms_norm_op = torch.library.custom_op("ftcore::rms_norm", mutates_args=())(_rms_norm_forward)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=_out_dtype(x, weight)), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("ftcore::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, compute_dw: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dx like x, dweight like weight, or an empty tensor when not compute_dw)."""
    impl = _backward_triton if use_triton(x) else rms_norm_backward_reference
    return impl(grad_y, x, weight, rstd, compute_dw)


@_rms_norm_backward_op.register_fake
def _(grad_y, x, weight, rstd, compute_dw):
    return torch.empty_like(x, memory_format=torch.contiguous_format), weight.new_empty(
        weight.shape if compute_dw else (0,)
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])  # x and the per-row rstd: not y, not a float32 copy
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[:2]
    dx, dw = _rms_norm_backward_op(grad_y, x, weight, rstd, need_dw)
    return (dx if need_dx else None), (dw if need_dw else None), None


_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)
_rms_norm = eager_twin(_rms_norm_op, _rms_norm_forward, _setup_context, _backward)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)) over the last dim, as `RMSNorm.forward`; x (..., N), weight (N,)."""
    return _rms_norm(x, weight, eps)[0]
