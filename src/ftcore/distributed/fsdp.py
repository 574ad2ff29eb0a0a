"""FSDP2 (`torch.distributed.fsdp.fully_shard`) applied to a decoder from outside the model.

Every transformer block is one FSDP unit (its parameters are all-gathered just before it runs and
freed after), and the root unit holds what is left: embeddings, final norm, output projection.
Parameters become DTensors sharded on dim 0 across the mesh, so each rank stores 1/N of each weight
and of its gradient and optimizer state.

LoRA: a block mixing the frozen base weight and trainable adapters is one unit; FSDP2 keeps
`requires_grad` per parameter, so only the adapters get gradients and optimizer state.
NF4 (QLoRA): `NF4Linear` keeps its packed data in buffers, which FSDP2 would leave whole on every
rank. `shard_model` first turns them into frozen parameters in place (same names, same state-dict
keys), so FSDP2 shards them on dim 0 and all-gathers them as 4-bit data (uint8 codes and fp32 scales;
a unit of mixed dtypes is all-gathered as bytes) just before the block runs. The scalar offset stays
a buffer (4 bytes). See `nf4_sharding.py` for loading and gathering such layers.

A full tensor loaded into a sharded module (the checkpointers' `module.load_state_dict({name: t})`)
is cut to this rank's shard by a load hook that `shard_model` installs, so checkpoint loading after
sharding reads each tensor once and keeps only the local shard.
"""

from __future__ import annotations

import inspect
from typing import cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor, distribute_tensor


def fsdp_mesh(device_type: str | None = None) -> DeviceMesh:
    """A 1-D mesh over every rank of the job (pure data-parallel sharding). Needs an initialized process group."""
    if not dist.is_initialized():
        raise ValueError(
            "fsdp_mesh needs a process group: call ftcore.distributed.env.init_distributed() first"
        )
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("dp_shard",))


def shard_model(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    reshard_after_forward: bool = True,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
) -> nn.Module:
    """Shard each `model.layers[i]` then the root with FSDP2; returns the same (now sharded) model.

    param_dtype: dtype the all-gathered parameters compute in (e.g. bf16); None keeps the stored dtype.
    reduce_dtype: dtype of the gradient reduce-scatter (fp32 for accuracy with bf16 compute); None = param_dtype.
    reshard_after_forward: free gathered parameters after each block's forward (ZeRO-3, least memory)
        rather than keep them until backward (ZeRO-2, one all-gather less per block).
    cpu_offload: keep sharded parameters, gradients and optimizer state in host memory; the optimizer
        step then runs on the CPU.
    Works on a model built on the meta device (shard, then `to_empty`, then load) or a materialized one.
    """
    options: dict = {"mesh": mesh}
    if param_dtype is not None or reduce_dtype is not None:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    from ftcore.distributed.nf4_sharding import nf4_buffers_to_parameters

    nf4_buffers_to_parameters(model)  # uint8 parts only: param_dtype leaves them as they are
    blocks = cast(nn.ModuleList, model.layers)
    last = len(blocks) - 1
    for index, block in enumerate(blocks):
        # The last block's backward starts right after the forward: resharding it would only buy an
        # immediate all-gather again (torchtitan makes the same exception).
        reshard = reshard_after_forward and index < last
        fully_shard(block, reshard_after_forward=reshard, **options)
    # The root (embeddings, final norm, output) stays gathered from its forward to its backward: the
    # training loss calls `model.hidden` and then reads `model.output_weight` outside any forward, and
    # backward needs these weights at once anyway.
    from ftcore.modules.host_embedding import host_parameters

    if host_params := host_parameters(model):  # offload_embedding: the table stays whole, in host memory
        _check_fsdp_can_ignore_params()
        options = {**options, "ignored_params": host_params}
    fully_shard(model, reshard_after_forward=False, **options)
    if hasattr(model, "hidden"):
        register_fsdp_forward_method(model, "hidden")  # gather the root around `hidden` as around forward
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # SUM gradients over ranks instead of averaging: the training loop already divides each
            # rank's loss by the GLOBAL trained-token count (ftcore.training.accumulation), so the
            # summed gradient is that of one global batch.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    install_full_tensor_load_hooks(model)
    return model


def reshard_all(model: nn.Module) -> None:
    """Free every gathered unit. Call after a forward under `torch.no_grad()` (evaluation): units that
    do not reshard after forward (the root, the last block) stay gathered, and the next training
    forward then skips their all-gather; measured on 2 gloo ranks, that step's gradients come out
    wrong (loss 1e-3 off the 1-process run from the next step on; exact with this call)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def install_full_tensor_load_hooks(model: nn.Module) -> None:
    """Let `load_state_dict` of any submodule accept full (unsharded) tensors for its DTensor parameters."""
    for module in model.modules():
        sharded = any(isinstance(p, DTensor) for p in module.parameters(recurse=False))
        if sharded and not getattr(module, "_ftcore_shards_full_tensors", False):
            module.register_load_state_dict_pre_hook(_shard_full_tensors_hook)
            # a plain marker attribute; Module.__setattr__ is typed for tensors and modules only
            module._ftcore_shards_full_tensors = True  # type: ignore[assignment]


def shard_like(param: DTensor, full: torch.Tensor) -> DTensor:
    """This rank's shard of `full`, laid out (mesh, placements, dtype) like `param`.

    Every rank passes the same full tensor (each reads the same checkpoint file), so the shard is cut
    locally (`src_data_rank=None`): no communication, and memory beyond the shard is one tensor.
    """
    if tuple(full.shape) != tuple(param.shape):
        raise ValueError(
            f"full tensor of shape {tuple(full.shape)} does not fit a parameter of shape {tuple(param.shape)}"
        )
    sharded = distribute_tensor(full.detach(), param.device_mesh, param.placements, src_data_rank=None)
    local = sharded.to_local().to(device=param.to_local().device, dtype=param.dtype)
    return DTensor.from_local(
        local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
    )


def _shard_full_tensors_hook(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    for name, param in module.named_parameters(recurse=False):
        key = prefix + name
        value = state_dict.get(key)
        if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and not isinstance(value, DTensor):
            if tuple(value.shape) == tuple(param.shape):  # a wrong shape is left for the loader to report
                state_dict[key] = shard_like(param, value)


def _check_fsdp_can_ignore_params() -> None:
    """FSDP2 leaves parameters unsharded (`ignored_params`) from torch 2.7; fail clearly before that."""
    if "ignored_params" not in inspect.signature(fully_shard).parameters:
        raise ValueError(
            f"offload_embedding: true under torchrun needs torch >= 2.7 (FSDP2's ignored_params), this is "
            f"torch {torch.__version__}; upgrade torch or set offload_embedding: false"
        )
