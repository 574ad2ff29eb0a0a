"""QLoRA's NF4 base under FSDP2: its packed data sharded like any parameter, all-gathered as 4-bit data.

FSDP2 (`fully_shard`) shards parameters only, and `NF4Linear` keeps its data in buffers, so without
this every rank would hold the whole NF4 base (0.5 byte per weight: ~35 GB of a 70B model per GPU).
`nf4_buffers_to_parameters`, run by `shard_model` before `fully_shard`, re-registers those buffers as
frozen parameters in place: the same attribute names and state-dict keys, so NF4Linear's own code
(forward, load, save) runs unchanged on the all-gathered tensors inside a block's forward. Outside a
forward the parts are DTensor shards, so two things are done here instead of in the layer:

- loading: a float `weight` (or a bitsandbytes entry set) is quantized whole by a staging NF4Linear
  on this rank's device, and only the local shard of each part is kept;
- gathering: the full parts are all-gathered, then a staging NF4Linear writes what the unsharded
  layer would (a bf16 `weight` by default, the parts inside `nf4_state_dict_mode("nf4")`).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ftcore.distributed.fsdp import shard_like
from ftcore.modules.nf4 import NF4Linear, nf4_buffer_shapes

_SHARDABLE = "_ftcore_nf4_parts_are_parameters"


def nf4_buffers_to_parameters(model: nn.Module) -> list[NF4Linear]:
    """Make each NF4Linear's packed codes and absmax codes (uint8) frozen parameters, in place.

    Call before `fully_shard` (on a meta or materialized model). The float parts stay buffers, whole
    on every rank: FSDP2's `param_dtype` would cast a float parameter (rounding the fp32 nested scales
    to bf16), and they are small (4 bytes per 16,384 weights and the scalar offset: ~17 MB for a 70B
    model, 0.05% of its NF4 bytes). Returns the NF4 layers.
    """
    layers = [module for module in model.modules() if isinstance(module, NF4Linear)]
    for layer in layers:
        if getattr(layer, _SHARDABLE, False):
            continue
        for name, buffer in list(layer.named_buffers(recurse=False)):
            if buffer.is_floating_point():
                continue
            delattr(layer, name)
            layer.register_parameter(name, nn.Parameter(buffer, requires_grad=False))
        # Loading calls `set_weight` with the full weight; once sharded it must keep the local shards.
        layer.set_weight = types.MethodType(_set_weight_into_shards, layer)  # type: ignore[method-assign]  # patching the instance
        setattr(layer, _SHARDABLE, True)
    return layers


def _quantizing_device(part: torch.Tensor) -> torch.device:
    """Where to quantize a full weight: the accelerator of the mesh (also under CPU offload)."""
    if isinstance(part, DTensor) and part.device_mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return part.device


def _set_weight_into_shards(layer: NF4Linear, weight) -> None:
    """NF4Linear.set_weight for a sharded layer: quantize (or check) the full weight, keep the local shards."""
    staging = NF4Linear(
        layer.in_dim,
        layer.out_dim,
        bias=False,
        device=_quantizing_device(layer.weight_packed),
        dtype=layer.dtype,
    )
    staging.set_weight(weight)  # the layer's own quantization and shape checks, on the full tensor
    with torch.no_grad():
        for name, full in staging.named_buffers():
            target = getattr(layer, name)
            target.copy_(shard_like(target, full) if isinstance(target, DTensor) else full)


def is_sharded_nf4(module: nn.Module) -> bool:
    """True for an NF4Linear whose parts were made parameters for FSDP2 (maybe gathered right now)."""
    return getattr(module, _SHARDABLE, False)


@contextlib.contextmanager
def nf4_parts_in_state_dict(module: nn.Module) -> Iterator[dict[NF4Linear, str | None]]:
    """Within the block, sharded NF4 layers under `module` write their parts (shards, no compute) to
    state dicts, not a weight dequantized from shards. Yields {layer: its own state_dict_mode}."""
    layers = [m for m in module.modules() if isinstance(m, NF4Linear) and is_sharded_nf4(m)]
    modes = {layer: layer.state_dict_mode for layer in layers}
    for layer in layers:
        layer.state_dict_mode = "nf4"
    try:
        yield modes
    finally:
        for layer, mode in modes.items():
            layer.state_dict_mode = mode


def nf4_part_names(layer: NF4Linear) -> list[str]:
    return list(nf4_buffer_shapes(layer.out_dim, layer.in_dim))


def find_nf4_parts(state: dict[str, torch.Tensor], layers) -> dict[str, NF4Linear]:
    """{state-dict key prefix: layer} for the sharded NF4 layers whose parts `state` holds (keep_vars)."""
    owner = {id(layer.weight_packed): layer for layer in layers}
    found = {}
    for key, value in state.items():
        if (layer := owner.get(id(value))) is not None:
            found[key[: -len("weight_packed")]] = layer
    return found


def unsharded_nf4_state(layer: NF4Linear, mode: str | None, parts: dict[str, torch.Tensor]) -> dict:
    """What the unsharded `layer` writes to a state dict (keys relative to it, bias aside), rebuilt
    from its full gathered `parts`: a `weight` in the layer's dtype, or the parts in "nf4" mode."""
    device = parts["weight_packed"].device
    staging = NF4Linear(layer.in_dim, layer.out_dim, bias=False, device=device, dtype=layer.dtype)
    staging.state_dict_mode = mode
    staging.load_state_dict(parts)
    return staging.state_dict()
