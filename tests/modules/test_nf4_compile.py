"""QLoRA's NF4 linear under torch.compile: opaque operators, same numbers as eager, no saved float weight.

The compiled runs use AOTAutograd with the min-cut partitioner (the one inductor uses) and the eager "nop"
compiler, so the partition into forward/backward graphs is inductor's while CPU tests stay fast.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.backends.debugging import aot_eager, boxed_nop
from torch.utils.checkpoint import checkpoint

from ftcore.kernels import nf4_linear
from ftcore.kernels import nf4_reference as ref
from ftcore.modules.lora import LoRALinear

IN_DIM, OUT_DIM, RANK = 128, 192, 8


def make_qlora_layer(use_bias: bool = False) -> tuple[LoRALinear, torch.Tensor]:
    """A QLoRA layer with a random base and a non-zero B (so both paths carry gradient); returns its float W0."""
    torch.manual_seed(0)
    layer = LoRALinear(IN_DIM, OUT_DIM, rank=RANK, alpha=16.0, quantize_base=True, use_bias=use_bias)
    w0 = torch.randn(OUT_DIM, IN_DIM) * 0.02
    layer.load_state_dict({"weight": w0}, strict=False)
    with torch.no_grad():
        layer.lora_b.weight.normal_(0, 0.02)
        if use_bias:
            layer.bias.normal_()
    return layer, w0


def forward_backward(fn, x: torch.Tensor, grad_out: torch.Tensor, params: list[nn.Parameter]):
    """(y, grad_x, grads of params) of one forward + backward from fresh leaves."""
    x = x.detach().clone().requires_grad_(True)
    for p in params:
        p.grad = None
    y = fn(x)
    y.backward(grad_out)
    return y.detach(), x.grad, [p.grad.clone() for p in params]


def assert_compiled_matches_eager(compiled, eager) -> None:
    """The output bit-equal; gradients to fp32 rounding: eager training runs the layer as one autograd node
    (ftcore.modules.lora_matmul, the adapter's input gradient added inside the base GEMM), compiled runs
    the plain ops, whose products the compiler may orient and sum differently."""
    (y_c, *grads_c), (y_e, *grads_e) = compiled, eager
    torch.testing.assert_close(y_c, y_e, rtol=0, atol=0)
    torch.testing.assert_close(grads_c, grads_e, rtol=1e-5, atol=1e-6)


def compile_and_run(module: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.fx.GraphModule]:
    """(fake tensors the compiled forward saves for backward, the backward graph) after one fwd + bwd.

    The saved tensors are the backward graph's inputs other than the incoming gradients (tangents).
    """
    backward_graphs = []

    def capture_backward(gm: torch.fx.GraphModule, example_inputs):
        backward_graphs.append(gm)
        return boxed_nop(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(
        module, fullgraph=True, backend=functools.partial(aot_eager, bw_compiler=capture_backward)
    )
    compiled(x.detach().clone().requires_grad_(True)).sum().backward()
    (graph,) = backward_graphs
    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder" and "tangents" not in n.name]
    return [n.meta["val"] for n in placeholders if isinstance(n.meta.get("val"), torch.Tensor)], graph


def called_ops(graph: torch.fx.GraphModule) -> set:
    return {n.target for n in graph.graph.nodes if n.op == "call_function"}


def full_float_weights(tensors: list[torch.Tensor]) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in tensors if t.is_floating_point() and tuple(t.shape) == (OUT_DIM, IN_DIM)]


@pytest.mark.parametrize("use_bias", [False, True])
def test_compiled_qlora_layer_matches_eager_and_fp32_reference(use_bias):
    layer, w0 = make_qlora_layer(use_bias)
    params = [layer.lora_a.weight, layer.lora_b.weight]
    x, grad_out = torch.randn(2, 3, IN_DIM), torch.randn(2, 3, OUT_DIM)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = forward_backward(
            torch.compile(layer, fullgraph=True, backend="aot_eager"), x, grad_out, params
        )
    assert not [w for w in caught if "lru_cache" in str(w.message)], (
        "the compiled region traced an lru_cache helper"
    )
    eager = forward_backward(layer, x, grad_out, params)
    assert_compiled_matches_eager(compiled, eager)
    # Independent path: plain torch ops on the reference-dequantized fp32 weight (QLoRA: W0 x + s B A x + b).
    w_deq = ref.dequantize_nf4(ref.quantize_nf4(w0), torch.float32)
    a, b = (p.detach().clone().requires_grad_(True) for p in params)
    bias = layer.bias.detach() if use_bias else None
    reference = forward_backward(
        lambda t: nn.functional.linear(t, w_deq, bias) + 2.0 * (t @ a.T) @ b.T, x, grad_out, [a, b]
    )
    torch.testing.assert_close(compiled, reference, rtol=1e-5, atol=1e-5)


def test_compiled_backward_saves_no_float_weight():
    layer, w0 = make_qlora_layer()
    x = torch.randn(2, 3, IN_DIM)
    saved, backward_graph = compile_and_run(layer, x)
    # W is dequantized inside the opaque backward operator, not traced into the graph (nor saved from forward).
    assert torch.ops.ftcore.nf4_linear_grad_input.default in called_ops(backward_graph)
    assert saved, "the backward graph should take saved tensors (at least x for lora_a's weight gradient)"
    assert full_float_weights(saved) == [], [(tuple(t.shape), t.dtype) for t in saved]
    # The check can fail: a frozen float base of the same shape must be saved for grad_x, and is seen.
    dense = nn.Linear(IN_DIM, OUT_DIM, bias=False).requires_grad_(False)
    assert full_float_weights(compile_and_run(dense, x)[0]) == [(OUT_DIM, IN_DIM)]


def test_compiled_activation_checkpointed_layer_matches_eager():
    # As ftcore.distributed.parallelize composes them: checkpoint the forward, then compile the checkpointed call.
    layer, _ = make_qlora_layer(use_bias=True)
    params = [layer.lora_a.weight, layer.lora_b.weight]
    x, grad_out = torch.randn(2, 3, IN_DIM), torch.randn(2, 3, OUT_DIM)
    checkpointed = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    torch._dynamo.reset()
    compiled = forward_backward(
        torch.compile(checkpointed, fullgraph=True, backend="aot_eager"), x, grad_out, params
    )
    assert_compiled_matches_eager(compiled, forward_backward(layer, x, grad_out, params))


def test_eager_backward_saves_no_float_weight():
    layer, _ = make_qlora_layer()
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(torch.randn(2, 3, IN_DIM, requires_grad=True)).sum().backward()
    assert any(t.dtype == torch.uint8 and t.numel() == OUT_DIM * IN_DIM // 2 for t in saved)  # packed codes
    assert full_float_weights(saved) == [], [(tuple(t.shape), t.dtype) for t in saved]


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck_nf4_operators(double_quant, with_bias):
    torch.manual_seed(0)
    parts = ref.quantize_nf4(torch.randn(OUT_DIM, IN_DIM), double_quant=double_quant)
    packed = parts.packed.view(OUT_DIM, IN_DIM // 2)
    bias = torch.randn(OUT_DIM, requires_grad=True) if with_bias else None
    x = torch.randn(4, IN_DIM, requires_grad=True)
    common = (packed, parts.absmax, parts.nested_absmax, parts.offset)
    torch.library.opcheck(torch.ops.ftcore.nf4_linear.default, (x, *common, bias, 64))
    grad_y = torch.randn(2, 3, OUT_DIM, requires_grad=True)
    torch.library.opcheck(torch.ops.ftcore.nf4_linear_grad_input.default, (grad_y, *common, 64))


def test_double_backward_through_nf4_linear():
    # grad_x = grad_y W is itself differentiable (w.r.t. grad_y): check it against the fp32 dequantized W.
    torch.manual_seed(0)
    parts = ref.quantize_nf4(torch.randn(OUT_DIM, IN_DIM))
    w = ref.dequantize_nf4(parts, torch.float64)
    x = torch.randn(3, IN_DIM, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(lambda t: nf4_linear(t, parts), (x,))
    y = nf4_linear(x, parts)
    torch.testing.assert_close(y, x.detach() @ w.T)


def test_nf4_linear_rejects_a_weight_of_the_wrong_width():
    parts = ref.quantize_nf4(torch.randn(OUT_DIM, IN_DIM))
    with pytest.raises(ValueError, match="x.shape\\[-1\\] = 64"):
        nf4_linear(torch.randn(2, 64), parts)
