"""Kernels: NF4 quantize / dequantize / linear, dispatched to Triton on CUDA and to the reference elsewhere.

The NF4 linear is two opaque operators, `ftcore::nf4_linear` (y = x W^T + b) and
`ftcore::nf4_linear_grad_input` (grad_x = grad_y W), each dequantizing W itself. torch.compile sees them
as single nodes: it can neither fuse into them nor keep their dequantized W. An autograd.Function is
traced through instead, leaving the partitioner free to keep its bf16 W (2 bytes per weight) for backward:
8B QLoRA compiled per block peaked at 17.5 GiB that way, 8.1 GiB (the eager peak) with these operators.
The autograd formula saves only the NF4 parts, which are the layer's own buffers: nothing new.
The forward operator runs the Triton NF4 GEMV (`nf4_gemv_triton`, decode: a few tokens), the tiled fused
dequantize-in-matmul (`nf4_matmul_triton`, only when forced) or dequantizes into a temporary and calls
cuBLAS; the grad-input operator the latter two. `nf4_matmul_path` is the one rule.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ftcore.kernels import nf4_reference
from ftcore.kernels.eager_twin import eager_twin
from ftcore.kernels.nf4_reference import NF4Parts

try:  # Triton is optional on CPU-only installs; the reference covers every device.
    from ftcore.kernels import nf4_gemv_triton, nf4_matmul_triton, nf4_triton
except ImportError:  # pragma: no cover - depends on the install
    # an optional module: None stands for "not installed"
    nf4_triton = nf4_matmul_triton = nf4_gemv_triton = None  # type: ignore[assignment]

# How the two NF4 linear operators compute: "auto" (the rule in `nf4_matmul_path`), or forced for tests and
# benchmarks to "gemv" (the Triton NF4 GEMV wherever it takes the call: forward, <= nf4_gemv_triton.MAX_TOKENS
# tokens; the auto rule elsewhere), "fused" (tiled Triton dequantize-in-matmul) or "dequant" (dequantize +
# cuBLAS).
# Read once from FTCORE_NF4_MATMUL; tests and scripts/bench_nf4.py set this attribute directly.
NF4_MATMUL_PATH = os.environ.get("FTCORE_NF4_MATMUL", "auto")
_NF4_MATMUL_PATHS = ("auto", "gemv", "fused", "dequant")
# "auto" fuses while a call has at most this many tokens (rows of x). Measured on an H200
# (scripts/bench_nf4.py, 2026-12-01): the tiled fused kernel was slower than dequantize + cuBLAS at every
# token count, 1.9-3.6x at M = 1 and 15-18x at 4096, so "auto" never picks it (0) and it stays a forced
# path until a kernel beats cuBLAS somewhere; docs/nf4.md has the table.
FUSED_NF4_MAX_TOKENS = 0
# "auto" runs the forward through the NF4 GEMV for 1..NF4_GEMV_MAX_TOKENS tokens (CUDA, bf16/fp16): it reads
# W once as NF4 bytes, where dequantize + cuBLAS writes and rereads a bf16 copy. Measured on an H200
# (bench_nf4.py, 2026-12-01, 8B shapes): at 1 token the GEMV took 0.61-0.88 of dequantize + cuBLAS's time
# on every layer; at 2 tokens k/v lost (1.06), at 4 all lost. So single-token decode only.
NF4_GEMV_MAX_TOKENS = 1

__all__ = [
    "NF4Parts",
    "quantize_nf4",
    "dequantize_nf4",
    "nf4_linear",
    "use_triton",
    "nf4_matmul_path",
    "use_fused_nf4_matmul",
]


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


def nf4_matmul_path(
    tokens: int, parts: NF4Parts, dtype: torch.dtype, device: torch.device, grad_input: bool = False
) -> str:
    """The NF4 linear's one dispatch rule: "gemv", "fused" or "dequant" for one operator call.

    Auto: the forward takes the GEMV for 1..NF4_GEMV_MAX_TOKENS tokens on CUDA in bf16/fp16, the tiled fused
    kernel for up to FUSED_NF4_MAX_TOKENS (0: never), else dequantize + cuBLAS; the grad-input (never run
    at decode) only the latter two. fp32 stays on cuBLAS."""
    if NF4_MATMUL_PATH not in _NF4_MATMUL_PATHS:
        raise ValueError(
            f"FTCORE_NF4_MATMUL / kernels.NF4_MATMUL_PATH must be one of {_NF4_MATMUL_PATHS}; got {NF4_MATMUL_PATH!r}"
        )
    if NF4_MATMUL_PATH == "dequant":
        return "dequant"
    fused_ok = nf4_matmul_triton is not None and nf4_matmul_triton.supports(parts, dtype)
    if NF4_MATMUL_PATH == "fused":  # forced: on CUDA, or on CPU tensors under TRITON_INTERPRET=1
        if not fused_ok:
            raise ValueError(
                f"NF4_MATMUL_PATH='fused' cannot take weight {tuple(parts.shape)} (block {parts.block_size}) "
                f"in {dtype}: the fused kernel needs Triton, a 2-D weight of whole blocks and bf16/fp16/fp32."
            )
        return "fused"
    gemv_ok = (
        not grad_input and nf4_gemv_triton is not None and nf4_gemv_triton.supports(parts, dtype, tokens)
    )
    if NF4_MATMUL_PATH == "gemv" and gemv_ok:  # forced wherever the GEMV takes the call; elsewhere auto
        return "gemv"
    # fp32 stays on cuBLAS: the tiled kernel's IEEE fp32 dot has no tensor-core path; the GEMV is unmeasured.
    auto_ok = dtype in (torch.bfloat16, torch.float16) and use_triton(device)
    if auto_ok and gemv_ok and 1 <= tokens <= NF4_GEMV_MAX_TOKENS:
        return "gemv"
    if auto_ok and fused_ok and 1 <= tokens <= FUSED_NF4_MAX_TOKENS:
        return "fused"
    return "dequant"


def use_fused_nf4_matmul(tokens: int, parts: NF4Parts, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the grad-input operator runs the tiled fused kernel (`nf4_matmul_path` with grad_input)."""
    return nf4_matmul_path(tokens, parts, dtype, device, grad_input=True) == "fused"


def _weight_parts(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    offset: torch.Tensor | None,
    block_size: int,
    dtype: torch.dtype,
) -> NF4Parts:
    """NF4Parts of the (out, in) weight from the operators' arguments; `packed` is (out, in / 2) bytes."""
    shape = torch.Size((packed.shape[0], packed.shape[1] * 2))
    return NF4Parts(packed.reshape(-1), absmax.reshape(-1), nested_absmax, offset, shape, dtype, block_size)


def _nf4_linear_forward(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    offset: torch.Tensor | None,
    bias: torch.Tensor | None,
    block_size: int,
) -> torch.Tensor:
    """x (..., in) @ W^T + bias -> (..., out), W dequantized to x's dtype (in registers when fused)."""
    parts = _weight_parts(packed, absmax, nested_absmax, offset, block_size, x.dtype)
    path = nf4_matmul_path(x.numel() // x.shape[-1], parts, x.dtype, x.device)
    if path != "dequant":
        matmul = nf4_gemv_triton.nf4_gemv if path == "gemv" else nf4_matmul_triton.nf4_matmul
        y = matmul(x.reshape(-1, x.shape[-1]), parts, bias)  # (tokens, out)
        # 2-D input (LoRALinear's rows): y itself, not a view, so the adapter can add into it in place
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])
    return F.linear(x, dequantize_nf4(parts, x.dtype), bias)


_nf4_linear_op = torch.library.custom_op("ftcore::nf4_linear", mutates_args=())(_nf4_linear_forward)


@_nf4_linear_op.register_fake
def _(x, packed, absmax, nested_absmax, offset, bias, block_size):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@torch.library.custom_op("ftcore::nf4_linear_grad_input", mutates_args=())
def _nf4_linear_grad_input_op(
    grad_y: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    offset: torch.Tensor | None,
    block_size: int,
) -> torch.Tensor:
    """grad_y (..., out) @ W (out, in) -> (..., in), W dequantized again (to grad_y's dtype), not saved."""
    parts = _weight_parts(packed, absmax, nested_absmax, offset, block_size, grad_y.dtype)
    if use_fused_nf4_matmul(grad_y.numel() // grad_y.shape[-1], parts, grad_y.dtype, grad_y.device):
        grad_x = nf4_matmul_triton.nf4_matmul_grad_input(grad_y.reshape(-1, grad_y.shape[-1]), parts)
        return grad_x.view(*grad_y.shape[:-1], grad_x.shape[-1])  # (tokens, in) -> (..., in)
    return grad_y @ dequantize_nf4(parts, grad_y.dtype)


@_nf4_linear_grad_input_op.register_fake
def _(grad_y, packed, absmax, nested_absmax, offset, block_size):
    return grad_y.new_empty((*grad_y.shape[:-1], packed.shape[1] * 2))


def _save_nf4_parts(ctx, inputs, output) -> None:
    # Only the NF4 parts (the layer's buffers, alive anyway): not x (grad_x does not need it), not W.
    _, packed, absmax, nested_absmax, offset, *_, block_size = inputs
    ctx.save_for_backward(packed, absmax, nested_absmax, offset)
    ctx.block_size = block_size


def _nf4_linear_backward(ctx, grad_y):
    packed, absmax, nested_absmax, offset = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = _nf4_linear_grad_input_op(grad_y, packed, absmax, nested_absmax, offset, ctx.block_size)
    if ctx.needs_input_grad[5]:
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)  # (tokens, out) -> (out,)
    return grad_x, None, None, None, None, grad_bias, None


def _nf4_linear_grad_input_backward(ctx, grad_grad_x):
    # grad_x = grad_y W is linear in grad_y, so its own gradient is grad_grad_x W^T: the forward operator.
    packed, absmax, nested_absmax, offset = ctx.saved_tensors
    grad_grad_y = _nf4_linear_op(grad_grad_x, packed, absmax, nested_absmax, offset, None, ctx.block_size)
    return grad_grad_y, None, None, None, None, None


_nf4_linear_op.register_autograd(_nf4_linear_backward, setup_context=_save_nf4_parts)
_nf4_linear = eager_twin(_nf4_linear_op, _nf4_linear_forward, _save_nf4_parts, _nf4_linear_backward)
_nf4_linear_grad_input_op.register_autograd(_nf4_linear_grad_input_backward, setup_context=_save_nf4_parts)


def nf4_linear(x: torch.Tensor, parts: NF4Parts, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ dequantize(parts)^T (out, in) + bias, differentiable w.r.t. x (and bias) only."""
    if len(parts.shape) != 2 or parts.shape[1] != x.shape[-1]:
        raise ValueError(
            f"nf4_linear needs a 2-D (out, in) NF4 weight with in = x.shape[-1] = {x.shape[-1]}; "
            f"got weight shape {tuple(parts.shape)}. Quantize the (out, in) weight of the linear layer."
        )
    packed = parts.packed.view(parts.shape[0], parts.shape[1] // 2)  # (out, in / 2) bytes
    return _nf4_linear(x, packed, parts.absmax, parts.nested_absmax, parts.offset, bias, parts.block_size)
