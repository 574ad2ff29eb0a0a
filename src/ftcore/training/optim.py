"""Optimizers named in configs, and gradient clipping.

Config: `optimizer: {_component_: ftcore.training.adamw, lr: 2e-4, weight_decay: 0.01}`; the recipe calls
`instantiate(cfg.optimizer, params)`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch


def _as_list(params: Iterable) -> list:
    params = list(params)
    if not params:
        raise ValueError("the optimizer got no parameters: is any parameter trainable (requires_grad=True)?")
    return params


def _all_tensors(params: list) -> list[torch.Tensor]:
    # params is either tensors or param groups (dicts with "params").
    tensors: list[torch.Tensor] = []
    for item in params:
        tensors.extend(item["params"] if isinstance(item, dict) else [item])
    return tensors


def adamw(
    params: Iterable,
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """torch AdamW; `fused=None` picks the fused CUDA kernel when every parameter is on CUDA."""
    params = _as_list(params)
    if fused is None:
        fused = all(t.device.type == "cuda" for t in _all_tensors(params))
    return torch.optim.AdamW(
        params,
        lr=lr,
        betas=cast("tuple[float, float]", tuple(betas)),
        eps=eps,
        weight_decay=weight_decay,
        fused=fused,
    )


def sgd(
    params: Iterable,
    lr: float = 1e-2,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> torch.optim.SGD:
    return torch.optim.SGD(
        _as_list(params), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
    )


def adamw_8bit(
    params: Iterable,
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    block_size: int = 256,
) -> torch.optim.Optimizer:
    """torchao's AdamW with 8-bit blockwise-quantized moments (about a quarter of AdamW's state memory)."""
    try:
        from torchao.optim import AdamW8bit
    except ImportError as error:
        raise ValueError("optimizer adamw_8bit needs torchao: pip install torchao") from error
    return AdamW8bit(
        _as_list(params), lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, block_size=block_size
    )


def cpu_offload_adamw(
    params: Iterable,
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    offload_gradients: bool = False,
    minimal_size: int = 4096,
) -> torch.optim.Optimizer:
    """torchao's CPUOffloadOptimizer around torch AdamW: moments and the step on the CPU (see
    `ftcore.training.cpu_offload`). One CUDA GPU; `offload_gradients=True` also frees each GPU gradient
    once copied to the CPU; tensors under `minimal_size` elements stay on the GPU with a GPU AdamW."""
    try:
        from ftcore.training.cpu_offload import CPUOffloadAdamW
    except ImportError as error:
        raise ValueError("optimizer cpu_offload_adamw needs torchao: pip install torchao") from error
    return CPUOffloadAdamW(
        _as_list(params),
        offload_gradients=offload_gradients,
        minimal_size=minimal_size,
        lr=lr,
        betas=tuple(betas),
        eps=eps,
        weight_decay=weight_decay,
    )


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> float:
    """Scale gradients so their global L2 norm is at most max_norm; returns the norm before clipping.

    Works on sharded (DTensor) gradients too: torch computes the global norm; it is returned as a float.
    """
    grads = [p for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm)
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)
