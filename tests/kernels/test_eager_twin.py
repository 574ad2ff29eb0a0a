"""Eager twins (ftcore.kernels.eager_twin): in eager mode the public functions build an autograd.Function
node, not the custom op's, and give the custom op's own outputs and gradients bit for bit."""

from __future__ import annotations

import torch

from ftcore.kernels import fused_norm, fused_rope, fused_swiglu


def _grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    return out.detach(), [t.grad for t in inputs if t.requires_grad], out.grad_fn


def test_eager_twins_match_their_custom_ops_exactly():
    torch.manual_seed(0)
    x, weight = torch.randn(3, 5, 16), torch.randn(16)
    gate, up = torch.randn(4, 24), torch.randn(4, 24)
    q, angles = torch.randn(2, 3, 5, 8).transpose(1, 2), torch.randn(1, 1, 3, 8)
    cases = [
        (
            lambda a, b: fused_norm.rms_norm(a, b, 1e-5),
            lambda a, b: fused_norm._rms_norm_op(a, b, 1e-5),
            (x, weight),
        ),
        (fused_swiglu.swiglu, fused_swiglu._swiglu_op, (gate, up)),
        (
            lambda t: fused_rope.rope(t, angles.cos(), angles.sin()),
            lambda t: fused_rope._rope_op(t, angles.cos(), angles.sin(), False),
            (q,),  # (B, n_heads, T, head_dim), a transposed view
        ),
    ]
    for public, custom_op, inputs in cases:
        out, grads, node = _grads(public, *inputs)
        ref_out, ref_grads, ref_node = _grads(custom_op, *inputs)
        assert "EagerTwin" in type(node).__name__ and "EagerTwin" not in type(ref_node).__name__
        assert torch.equal(out, ref_out)
        assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads, strict=True))


def test_nf4_linear_uses_its_eager_twin_and_matches_the_operator():
    from ftcore.kernels import _nf4_linear_op, nf4_linear, quantize_nf4

    torch.manual_seed(0)
    parts = quantize_nf4(torch.randn(32, 64))
    x = torch.randn(3, 64)
    packed = parts.packed.view(32, 32)
    args = (parts.absmax, parts.nested_absmax, parts.offset, None, parts.block_size)
    out, (grad,), node = _grads(lambda t: nf4_linear(t, parts), x)
    ref_out, (ref_grad,), ref_node = _grads(lambda t: _nf4_linear_op(t, packed, *args), x)
    assert "EagerTwin" in type(node).__name__ and "EagerTwin" not in type(ref_node).__name__
    assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad)
