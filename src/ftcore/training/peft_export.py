"""Write LoRA/DoRA adapters in HF PEFT's format, so `peft.PeftModel.from_pretrained` loads them.

The folder holds `adapter_model.safetensors` and `adapter_config.json`. PEFT names tensors by the HF
module path under `base_model.model.` with the adapter name dropped: `<path>.lora_A.weight`,
`<path>.lora_B.weight` and, for DoRA, `<path>.lora_magnitude_vector` (a vector of size out).
PEFT scales by lora_alpha / r, as LoRALinear does, so the numbers are copied unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import torch
from torch import nn

from ftcore.modules.lora import lora_modules
from ftcore.training.checkpoint_io import atomic_write_file, atomic_write_json

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def hf_module_path(ftcore_module: str) -> str:
    """`layers.0.attn.q_proj` -> `model.layers.0.self_attn.q_proj` (via the checkpoint name table)."""
    from ftcore.models.hf_names import ftcore_to_hf

    return ftcore_to_hf(f"{ftcore_module}.weight").removesuffix(".weight")


def peft_adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of `model` under PEFT's names, as contiguous CPU tensors."""
    state: dict[str, torch.Tensor] = {}
    for name, module in lora_modules(model):
        prefix = f"base_model.model.{hf_module_path(name)}"
        state[f"{prefix}.lora_A.weight"] = module.lora_a.weight
        state[f"{prefix}.lora_B.weight"] = module.lora_b.weight
        if module.use_dora:  # then the magnitude is set
            state[f"{prefix}.lora_magnitude_vector"] = cast(nn.Parameter, module.magnitude)
    if not state:
        raise ValueError(
            "save_peft_adapter: the model has no LoRALinear layers (was it built with a lora_* builder?)"
        )
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_peft_adapter(
    model: nn.Module,
    output_dir: str | Path,
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    base_model_name_or_path: str | None = None,
    use_dora: bool = False,
    target_modules_hf: list[str] | None = None,
) -> Path:
    """Write the adapter of `model` to output_dir (both files atomically); returns output_dir.

    `target_modules_hf` are the HF leaf names PEFT wraps (e.g. ["q_proj", "v_proj"]); by default they
    are read off the model's LoRALinear layers.
    """
    from safetensors.torch import save_file

    state = peft_adapter_state_dict(model)
    found = sorted({hf_module_path(name).rsplit(".", 1)[-1] for name, _ in lora_modules(model)})
    if target_modules_hf is None:
        target_modules_hf = found
    elif missing := sorted(set(found) - set(target_modules_hf)):
        raise ValueError(
            f"save_peft_adapter: the model has LoRA on {missing}, missing from target_modules_hf"
        )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(target_modules_hf),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": use_dora,
        "use_rslora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    output_dir = Path(output_dir)
    atomic_write_file(
        output_dir / ADAPTER_WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"})
    )
    atomic_write_json(config, output_dir / ADAPTER_CONFIG)
    return output_dir
