"""Eager twins of the kernels' custom operators: the same forward and backward code, without the Python
autograd glue of `torch.library.custom_op`.

The operators (`ftcore::nf4_linear`, `ftcore::rms_norm`, `ftcore::rope`, `ftcore::swiglu`) are custom ops
so that torch.compile treats them as opaque nodes. In eager mode that wrapping is costly: profiled on the
H200 machine (8B QLoRA, batch 2 x 2048, one step), each custom-op backward node took 0.2-0.3 ms of host
time (`GeneratedBackwardFor_ftcore_nf4_linear` 0.30 ms a call, `rms_norm` 0.26, `rope` 0.20), and the
eager step was host-bound: 0.65 s of wall time for 0.36 s of GPU work. An `autograd.Function` runs the
op's own forward implementation, `setup_context` and backward formula; a microbenchmark on this project's
CPU machine put a custom op's forward at +15 us over a Function's. So: the custom op while compiling,
the Function otherwise. Both run the same code, so their numbers are identical.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def eager_twin(op: Callable, forward: Callable, setup_context: Callable, backward: Callable) -> Callable:
    """`op(*args)` under torch.compile; elsewhere an autograd.Function of `forward` (the op's
    implementation), `setup_context(ctx, inputs, output)` and `backward(ctx, *grads)` (the formulas the
    op registered with `register_autograd`)."""

    class EagerTwin(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = forward(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    EagerTwin.__name__ = f"EagerTwin_{getattr(forward, '__name__', 'op')}"

    def call(*inputs):
        if torch.compiler.is_compiling():
            return op(*inputs)
        return EagerTwin.apply(*inputs)

    return call
