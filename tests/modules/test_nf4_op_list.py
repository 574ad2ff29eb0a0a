"""The NF4 linear's forward+backward runs no more work on activation-sized tensors than a frozen bf16
nn.Linear: no extra copy / clone / contiguous / cast of x, y, grad_y or grad_x, and the same number of
matmuls. Only the weight side differs (the dequantize), so the NF4 cost over bf16 is the dequantize alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ftcore.kernels import nf4_reference as ref
from ftcore.modules.nf4 import nf4_linear, to_nf4

BATCH, SEQ, IN_DIM, OUT_DIM = 2, 24, 128, 64  # 48 tokens: no weight-side shape has 48 leading elements
TOKENS = BATCH * SEQ
COPY_OPS = ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::to")
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm")


def _is_activation(shape: list[int]) -> bool:
    # x / y / grad_y / grad_x as (tokens, features) or (batch, seq, features).
    return len(shape) >= 2 and math.prod(shape[:-1]) == TOKENS and shape[-1] in (IN_DIM, OUT_DIM)


def _activation_ops(forward) -> dict[str, int]:
    """aten ops of one fwd+bwd (frozen weight, grad to x only) that take an activation-sized tensor."""
    torch.manual_seed(0)
    x = torch.randn(BATCH, SEQ, IN_DIM, dtype=torch.bfloat16, requires_grad=True)
    grad_y = torch.randn(BATCH, SEQ, OUT_DIM, dtype=torch.bfloat16)
    forward(x).backward(grad_y)  # warm: lazy table builds stay out of the count
    x.grad = None
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        forward(x).backward(grad_y)
    counts: dict[str, int] = {}
    for event in prof.events():
        if event.name.startswith("aten::") and any(_is_activation(s) for s in event.input_shapes if s):
            counts[event.name] = counts.get(event.name, 0) + 1
    return counts


def _copies(counts: dict[str, int]) -> int:
    return sum(counts.get(name, 0) for name in COPY_OPS)


def _matmuls(counts: dict[str, int]) -> int:
    return sum(counts.get(name, 0) for name in MATMUL_OPS)


def _nf4_and_frozen_baseline():
    torch.manual_seed(0)
    w_nf4 = to_nf4((torch.randn(OUT_DIM, IN_DIM) * 0.02).bfloat16())
    frozen = nn.Linear(IN_DIM, OUT_DIM, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        frozen.weight.copy_(ref.dequantize_nf4(w_nf4, torch.bfloat16))
    return w_nf4, frozen


def test_nf4_fwd_bwd_has_no_activation_copies_beyond_frozen_bf16_linear():
    w_nf4, frozen = _nf4_and_frozen_baseline()
    baseline, nf4 = _activation_ops(frozen), _activation_ops(lambda t: nf4_linear(t, w_nf4))
    assert _matmuls(baseline) == 2, baseline  # y = x W^T and grad_x = grad_y W
    assert _matmuls(nf4) == _matmuls(baseline), (nf4, baseline)
    assert _copies(nf4) <= _copies(baseline), (nf4, baseline)


def test_activation_copy_detector_fires_on_a_copying_linear():
    # Control: the same check on a linear that casts x to fp32 and back (what a dtype mismatch costs).
    w_nf4, frozen = _nf4_and_frozen_baseline()
    weight = frozen.weight

    def copying_linear(x):
        return F.linear(x.float().to(torch.bfloat16), weight)

    assert _copies(_activation_ops(copying_linear)) > _copies(_activation_ops(frozen))


def test_nf4_fwd_bwd_values_equal_the_frozen_bf16_linear_on_the_dequantized_weight():
    # Same GEMMs on the same bf16 W, so bit-identical results, not merely close.
    w_nf4, frozen = _nf4_and_frozen_baseline()
    torch.manual_seed(1)
    x = torch.randn(BATCH, SEQ, IN_DIM, dtype=torch.bfloat16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    grad_y = torch.randn(BATCH, SEQ, OUT_DIM, dtype=torch.bfloat16)
    y, y_ref = nf4_linear(x, w_nf4), frozen(x_ref)
    y.backward(grad_y)
    y_ref.backward(grad_y)
    assert torch.equal(y, y_ref) and torch.equal(x.grad, x_ref.grad)
