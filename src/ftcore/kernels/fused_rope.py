"""Rotary embedding ("rotate half" layout) as one kernel: `rope(x, cos, sin) = x * cos + rotate_half(x) * sin`.

Eager PyTorch spends chunk, neg, cat, two products and a sum on it, each writing a full copy of q or k.
The kernel rotates each pair (x_i, x_{i + D/2}) in float32 and writes once. q and k arrive as
(B, n_heads, T, head_dim) views of (B, T, n_heads, head_dim) projections: the kernel takes any strides,
copies nothing, and writes its output in x's layout (what SDPA gets from the unfused formula too).
One program rotates all heads of one (batch, position), so it reads that position's angles once.

cos / sin are RotaryEmbedding.cos_sin's (B or 1, 1, T, head_dim) tables, whose two halves are equal
(the angles are concatenated with themselves); the kernel reads the first half only. The backward is
the rotation by the negative angle (a rotation's transpose), so it is the same kernel with -sin.
"""

from __future__ import annotations

import torch

from ftcore.kernels.eager_twin import eager_twin
from ftcore.kernels.fused_common import jit, next_power_of_2, num_warps_for, tl, use_triton


@jit
def _rope_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr, n_heads,
    sxb, sxh, sxt, sxd, sob, soh, sot, sod, scb, sct, scd,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, INVERSE: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]  # (BLOCK_H, 1)
    dims = tl.arange(0, BLOCK_D)[None, :]  # (1, BLOCK_D): the first half's dims
    mask = (heads < n_heads) & (dims < HALF)
    angle_offsets = b * scb + t * sct + dims * scd
    cos = tl.load(cos_ptr + angle_offsets, mask=dims < HALF, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + angle_offsets, mask=dims < HALF, other=0.0).to(tl.float32)
    if INVERSE:
        sin = -sin
    x_first = x_ptr + b * sxb + t * sxt + heads * sxh + dims * sxd
    x1 = tl.load(x_first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_first + HALF * sxd, mask=mask, other=0.0).to(tl.float32)
    out_first = out_ptr + b * sob + t * sot + heads * soh + dims * sod
    tl.store(out_first, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_first + HALF * sod, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RotaryEmbedding.forward's formula."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    batch, _, seq_len, head_dim = x.shape if x.dim() == 4 else (0, 0, 0, 1)  # 1: fails the check below
    ok = x.dim() == 4 and head_dim % 2 == 0 and cos.shape == sin.shape and cos.dim() == 4
    if not ok or cos.shape[1:] != (1, seq_len, head_dim) or cos.shape[0] not in (1, batch):
        raise ValueError(
            f"rope needs x (B, n_heads, T, head_dim) with an even head_dim and cos, sin (B or 1, 1, T, "
            f"head_dim); got x {tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
        )


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """x (B, H, T, D) rotated into a new tensor of x's strides (empty_like keeps a transposed layout)."""
    out = torch.empty_like(x)
    if not use_triton(x):
        out.copy_(rope_reference(x, cos, -sin if inverse else sin))
        return out
    batch, n_heads, seq_len, head_dim = x.shape
    cos, sin = cos.expand(batch, 1, seq_len, head_dim), sin.expand(batch, 1, seq_len, head_dim)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    block_h, block_d = next_power_of_2(n_heads), next_power_of_2(head_dim // 2)
    if x.numel():
        _rope_kernel[(seq_len, batch)](
            x, cos, sin, out, n_heads, *x.stride(), *out.stride(), cos.stride(0), cos.stride(2), cos.stride(3),
            HALF=head_dim // 2, BLOCK_H=block_h, BLOCK_D=block_d, INVERSE=inverse,
            num_warps=num_warps_for(block_h * block_d),
        )  # fmt: skip
    return out


def _rope_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """x (B, H, T, D) rotated by the angles of cos, sin (B or 1, 1, T, D); by their negatives if inverse."""
    return _rotate(x, cos, sin, inverse)


_rope_op = torch.library.custom_op("ftcore::rope", mutates_args=())(_rope_forward)


@_rope_op.register_fake
def _(x, cos, sin, inverse):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output) -> None:
    _, cos, sin, inverse = inputs
    ctx.save_for_backward(cos, sin)  # the angles only: the backward needs no x
    ctx.inverse = inverse


def _backward(ctx, grad):
    cos, sin = ctx.saved_tensors
    return _rope_op(grad, cos, sin, not ctx.inverse), None, None, None


_rope_op.register_autograd(_backward, setup_context=_setup_context)
_rope = eager_twin(_rope_op, _rope_forward, _setup_context, _backward)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, n_heads, T, head_dim), cos/sin (B or 1, 1, T, head_dim) -> x * cos + rotate_half(x) * sin."""
    _check(x, cos, sin)
    return _rope(x, cos, sin, False)
