"""Weights and training state of a sharded (FSDP2) model: stream a full checkpoint in, gather a full
state dict out to rank 0 one tensor at a time, and save/resume a sharded training state with
`torch.distributed.checkpoint` (DCP), which reshards on load so a run can resume on another world size.

All functions also work on a plain, unsharded model in a single process.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from ftcore.distributed.fsdp import install_full_tensor_load_hooks
from ftcore.distributed.nf4_sharding import (
    find_nf4_parts,
    nf4_part_names,
    nf4_parts_in_state_dict,
    unsharded_nf4_state,
)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# ---- loading ------------------------------------------------------------------------------------
def load_full_state_streaming(
    model: nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]], source: str = "checkpoint"
) -> None:
    """Copy full (unsharded) tensors, one at a time, into a materialized (possibly sharded) model.

    Every rank iterates the same tensors (e.g. each reads the same safetensors files, memory-mapped,
    so a node's page cache holds one copy) and keeps only its own shard of each. Unknown names, wrong
    shapes and tensors the model needs but never received raise ValueError naming `source`.
    """
    from ftcore.models.checkpoint_common import TensorLoader

    install_full_tensor_load_hooks(model)  # no-op on an unsharded model; idempotent effect otherwise
    loader = TensorLoader(model, source=source)
    with torch.no_grad():
        for name, tensor in named_tensors:
            loader.load(name, tensor)
    loader.finish()


# ---- gathering ----------------------------------------------------------------------------------
def _state_units(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(prefix, module) pieces whose state dicts together make the model's, one block at a time."""
    for name, child in model.named_children():
        if name == "layers":
            for index, block in enumerate(cast(nn.ModuleList, child)):
                yield f"layers.{index}.", block
        else:
            yield f"{name}.", child


def _full_tensor(value: torch.Tensor) -> torch.Tensor:
    if not isinstance(value, DTensor):
        return value.detach()
    if value.to_local().device.type != value.device_mesh.device_type:
        # CPU-offloaded shards: the collective runs on the mesh's device (NCCL cannot gather host memory).
        value = cast(DTensor, value.to(value.device_mesh.device_type))
    return value.full_tensor().detach()


def iter_full_state(model: nn.Module, keys: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, full CPU tensor) on rank 0, one tensor at a time; other ranks yield nothing.

    Every rank must drive the iterator to the end (each gather is a collective). Peak memory is one
    full tensor on the accelerator and, on rank 0, what the caller keeps. `keys` restricts the names.
    A sharded NF4 layer is gathered as its 4-bit parts and written as the unsharded layer would be
    (a bf16 `weight`, or the parts inside `nf4_state_dict_mode("nf4")`).
    """
    decoder_layout = isinstance(getattr(model, "layers", None), nn.ModuleList) and not model._parameters
    units = list(_state_units(model)) if decoder_layout and not model._buffers else [("", model)]
    for prefix, module in units:
        with nf4_parts_in_state_dict(module) as nf4_modes:
            state = module.state_dict(prefix=prefix, keep_vars=True)
        nf4_layers = find_nf4_parts(state, nf4_modes)
        nf4_keys = {p + part for p, layer in nf4_layers.items() for part in nf4_part_names(layer)}
        for name, value in state.items():
            if name in nf4_keys:
                layer_prefix = name[: -len("weight_packed")]
                if layer_prefix in nf4_layers:  # once per layer, at its packed bytes
                    yield from _full_nf4_layer(state, layer_prefix, nf4_layers[layer_prefix], nf4_modes, keys)
                continue
            if keys is not None and name not in keys:
                continue
            full = _full_tensor(value)
            if _rank() == 0:
                yield name, full.to("cpu", copy=True)
            del full


def _full_nf4_layer(state, prefix, layer, modes, keys) -> Iterator[tuple[str, torch.Tensor]]:
    names = nf4_part_names(layer)
    if keys is not None and prefix + "weight" not in keys and not any(prefix + n in keys for n in names):
        return
    parts = {name: _full_tensor(state[prefix + name]) for name in names}  # 4-bit data on the wire
    if _rank() == 0:
        for name, full in unsharded_nf4_state(layer, modes[layer], parts).items():
            if keys is None or prefix + name in keys:
                yield prefix + name, full.to("cpu", copy=True)


def gather_full_state_dict(model: nn.Module, keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The full state dict (CPU tensors, the model's own names) on rank 0; `{}` on the other ranks.

    For HF-layout export (`checkpointer.save`) and PEFT adapters (`keys` = the adapter names).
    """
    return dict(iter_full_state(model, keys))


# ---- sharded training state (DCP) -----------------------------------------------------------------
def _training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The trainable weights and the optimizer state, as (sharded) tensors keyed by parameter name.

    Frozen weights (a LoRA base, NF4 buffers) are left out: the base checkpoint already holds them.
    """
    # The parameters themselves (sharded DTensors; DCP loads into them in place), not
    # get_model_state_dict: that builds the whole state dict, NF4 bases included.
    weights = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    return {
        "model": weights,
        "optimizer": get_optimizer_state_dict(model, optimizer),
    }


def save_training_state(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> Path:
    """Every rank writes its shards of the trainable weights and optimizer state into `folder` (DCP format).

    Call on all ranks with the same folder; DCP coordinates and rank 0 writes the metadata file.
    """
    folder = Path(folder)
    dcp.save(_training_state(model, optimizer), checkpoint_id=str(folder))
    return folder


def load_training_state(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load what `save_training_state` wrote, on any number of ranks: DCP reads each rank's new shard."""
    folder = Path(folder)
    if not (folder / ".metadata").is_file():
        raise ValueError(
            f"{folder} is not a distributed training state (no .metadata file); point at the folder "
            "save_training_state wrote"
        )
    state = _training_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(folder))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
