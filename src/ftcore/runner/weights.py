"""Whole-model weights in a checkpoint folder: HF layout through the run's checkpointer when it can
write one, else ftcore's own names in a single safetensors file (random-init and GGUF bases)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

NATIVE_FILE = "ftcore_model.safetensors"


def save_model_weights(checkpointer, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if checkpointer is not None and hasattr(checkpointer, "save"):
        checkpointer.save(state_dict, folder)
        return
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(folder / NATIVE_FILE))


def load_model_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load what `save_model_weights` wrote, tensor by tensor, into a materialized model."""
    if (folder / NATIVE_FILE).is_file():
        params = model.state_dict()
        with safe_open(str(folder / NATIVE_FILE), framework="pt") as f, torch.no_grad():
            for name in f.keys():
                if name not in params:
                    raise ValueError(f"{folder / NATIVE_FILE}: tensor {name!r} is not in the model")
                params[name].copy_(f.get_tensor(name))
        return
    from ftcore.models import HFCheckpointer

    HFCheckpointer(checkpoint_dir=str(folder)).load_into(model)
