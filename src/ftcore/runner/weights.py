"""Whole-model weights in a checkpoint folder: the run's checkpointer's layout when it has one (HF, or
Meta's for a MetaCheckpointer; a GGUF base is written in HF layout), else ftcore's own names in a single
safetensors file (random-init bases)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from safetensors import safe_open
from safetensors.torch import save_file

if TYPE_CHECKING:
    from ftcore.models import TransformerDecoder

NATIVE_FILE = "ftcore_model.safetensors"


def save_model_weights(checkpointer, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if checkpointer is not None and hasattr(checkpointer, "save"):
        checkpointer.save(state_dict, folder)
        return
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(folder / NATIVE_FILE))


def load_model_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load what `save_model_weights` wrote, tensor by tensor, into a materialized (maybe sharded) model;
    a sharded model keeps only its shard of each tensor."""
    if (folder / NATIVE_FILE).is_file():
        from ftcore.distributed.state import load_full_state_streaming

        path = str(folder / NATIVE_FILE)
        with safe_open(path, framework="pt") as f:
            load_full_state_streaming(model, ((name, f.get_tensor(name)) for name in f.keys()), source=path)
        return
    from ftcore.models import HFCheckpointer, MetaCheckpointer

    decoder = cast("TransformerDecoder", model)
    if any(folder.glob("consolidated.*.pth")):  # written by a MetaCheckpointer
        MetaCheckpointer(checkpoint_dir=str(folder)).load_into(decoder)
        return
    HFCheckpointer(checkpoint_dir=str(folder)).load_into(decoder)
