"""Swap the fused kernels into a built decoder from outside the model: `apply_fused_kernels(model)`.

Every RMSNorm, FeedForward (SwiGLU) and RotaryEmbedding gets a new `forward` on the instance, the way
`apply_activation_checkpointing` wraps a block's: the modules, their parameters and the state dict stay
those of the plain model, so checkpoints, LoRA targets and FSDP sharding are unchanged. Each fused
forward computes what the module's own one does (ftcore.kernels.fused_* say how, and to what precision).
Apply it before activation checkpointing and compile (`parallelize(..., fused_kernels=True)` does).
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import nn

from ftcore.kernels.fused_norm import rms_norm
from ftcore.kernels.fused_rope import rope
from ftcore.kernels.fused_swiglu import swiglu
from ftcore.models.transformer import FeedForward, RMSNorm, RotaryEmbedding


def _rms_norm_forward(self: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    return rms_norm(x, self.weight, self.eps)


def _feed_forward_forward(self: FeedForward, x: torch.Tensor) -> torch.Tensor:
    return self.w2(swiglu(self.w1(x), self.w3(x)))


def _rotary_forward(self: RotaryEmbedding, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    cos, sin = self.cos_sin(input_pos, x.dtype)  # (B, 1, T, head_dim) each
    return rope(x, cos, sin)


_FUSED_FORWARDS: dict[type[nn.Module], Callable[..., torch.Tensor]] = {
    RMSNorm: _rms_norm_forward,
    FeedForward: _feed_forward_forward,
    RotaryEmbedding: _rotary_forward,
}


def apply_fused_kernels(model: nn.Module) -> int:
    """Give every RMSNorm, FeedForward and RotaryEmbedding in `model` its fused forward; returns how many.

    Exact types only: a subclass may compute something else, and keeps its own forward."""
    count = 0
    for module in model.modules():
        fused = _FUSED_FORWARDS.get(type(module))
        if fused is not None:
            module.forward = types.MethodType(fused, module)
            count += 1
    return count
