"""Shared by the tests that train a tiny LoRA model: only its adapters trainable, B non-zero."""

from __future__ import annotations

import torch

from ftcore.modules.lora import get_adapter_params, set_trainable_params


def train_adapters_only(model: torch.nn.Module, b_std: float) -> None:
    """Draw every LoRA B from N(0, b_std) (zero-init B would hide a wrong adapter path: its product
    would be zero) and freeze all but the adapters."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_b" in name:
                param.normal_(0.0, b_std)
    set_trainable_params(model, get_adapter_params(model))
