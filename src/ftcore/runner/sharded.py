"""The multi-process (torchrun + FSDP2) side of a fine-tuning run: join the process group, build the
sharded model, write a checkpoint folder from every rank, and bring sharded weights back to one place.

Single-process runs never enter this file's collectives: each function here is called only when
`launched_by_torchrun()`, or returns the plain single-process answer.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from ftcore.config import instantiate
from ftcore.training import atomic_write_dir
from ftcore.training.state import check_optimizer_state_kind

log = logging.getLogger("ftcore")

DCP_DIR = (
    "distributed_state"  # the sharded trainable weights + optimizer state (torch.distributed.checkpoint)
)
_FSDP_KEYS = ("reshard_after_forward", "cpu_offload", "param_dtype", "reduce_dtype")


@dataclass(frozen=True)
class FSDPOptions:
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    param_dtype: torch.dtype | None = None  # None: compute in the stored dtype (config key `dtype`)
    reduce_dtype: torch.dtype | None = None  # None: reduce gradients in param_dtype


def fsdp_options(node: DictConfig | None) -> FSDPOptions:
    """Read the optional `fsdp:` config node, e.g. `{reshard_after_forward: true, reduce_dtype: fp32}`."""
    from ftcore.runner.setup import resolve_dtype

    values = cast("dict[str, Any]", dict(node or {}))
    if unknown := sorted(set(values) - set(_FSDP_KEYS)):
        raise ValueError(f"config key `fsdp` has unknown key(s) {unknown}; use any of {list(_FSDP_KEYS)}")
    for key in ("param_dtype", "reduce_dtype"):
        if values.get(key) is not None:
            values[key] = resolve_dtype(values[key], torch.device("cpu"))
    return FSDPOptions(**values)


def join_process_group(cfg: DictConfig):
    """Under torchrun: join the job's process group and return its DistributedEnv; else None."""
    from ftcore.distributed.env import init_distributed, launched_by_torchrun

    if not launched_by_torchrun():
        return None
    # `device: cpu` on a GPU machine still means CPU tensors, hence gloo.
    backend = "gloo" if cfg.get("device", "auto") == "cpu" else None
    return init_distributed(backend=backend)


@contextlib.contextmanager
def main_rank_first(sharded: bool) -> Iterator[None]:
    """Rank 0 runs the block first (it may download or generate files), then the others, which then
    find those files complete instead of racing to write them."""
    if sharded and dist.get_rank() != 0:
        dist.barrier()
    yield
    if sharded and dist.get_rank() == 0:
        dist.barrier()


def build_sharded_model(
    cfg: DictConfig,
    device: torch.device,
    dtype: torch.dtype,
    checkpointer,
    select_trainable: Callable[[nn.Module], list],
) -> tuple[nn.Module, list[nn.Parameter]]:
    """Meta build -> select_trainable -> parallelize (AC, compile, FSDP2) -> to_empty -> init -> load.

    Without a checkpointer (random start) the whole model is initialised before sharding, exactly as one
    process does, so 1 and N processes start from the same weights: random init of a sharded DTensor
    draws the same numbers on every rank (each shard a copy of the first), not the shards of one
    tensor. The cost is one full model per rank during setup. With a checkpointer each rank holds only
    its shards plus one tensor being read; the LoRA adapters, which no base checkpoint holds, are drawn
    as full tensors from the config's seed and cut to shards, as one process draws them
    (`draw_adapters_from_seed`), so they are the same on any number of ranks.
    Returns the model and its trainable parameters (the sharded ones, in `select_trainable`'s order).
    """
    from ftcore.distributed.fsdp import fsdp_mesh
    from ftcore.distributed.parallelize import parallelize, speed_options
    from ftcore.models import init_weights
    from ftcore.runner.setup import build_model, default_dtype, draw_adapters_from_seed

    options = fsdp_options(cfg.get("fsdp"))
    home = torch.device("cpu") if options.cpu_offload else device
    if checkpointer is None:
        model = build_model(cfg.model, home, dtype, None)
    else:
        with default_dtype(dtype), torch.device("meta"):
            model = instantiate(cfg.model)
    ids = {id(p): name for name, p in model.named_parameters()}
    names = [ids[id(p)] for p in select_trainable(model)]
    parallelize(
        model,
        **speed_options(cfg),
        fsdp_mesh=fsdp_mesh(device.type),
        reshard_after_forward=options.reshard_after_forward,
        param_dtype=options.param_dtype,
        reduce_dtype=options.reduce_dtype,
        cpu_offload=options.cpu_offload,
    )
    if checkpointer is not None:
        model.to_empty(device=home)
        with torch.no_grad():
            init_weights(model)  # on shards: numbers differ with the world size; the checkpoint replaces them
        draw_adapters_from_seed(model, cfg.get("seed", 0))  # the same on any number of ranks
        checkpointer.load_into(model)
        for module in model.modules():  # DoRA's magnitude is the norm of the loaded base rows
            if getattr(module, "use_dora", False):
                module.initialize_dora_magnitude()
    params = dict(model.named_parameters())
    return model, [params[name] for name in names]


# ---- checkpoints ---------------------------------------------------------------------------------
@contextlib.contextmanager
def shared_atomic_dir(final_dir: Path, sharded: bool) -> Iterator[Path]:
    """`atomic_write_dir` for all ranks at once: rank 0 creates the temporary folder and tells the
    others its name; every rank writes its part; rank 0 renames it once all have finished."""
    if not sharded:
        with atomic_write_dir(final_dir) as folder:
            yield folder
        return
    with contextlib.ExitStack() as stack:
        name = [str(stack.enter_context(atomic_write_dir(final_dir)))] if dist.get_rank() == 0 else [None]
        dist.broadcast_object_list(name, src=0)
        yield Path(cast(str, name[0]))  # rank 0's folder name, broadcast to all
        dist.barrier()  # every rank's files are in place before rank 0 renames the folder
    dist.barrier()  # and the final folder exists before anyone reads or prunes it


class OptimizerStateInDCP:
    """Stands in for the optimizer in training_state.pt when its state is in `distributed_state/`
    (sharded per rank, readable on any number of ranks) rather than in that single file."""

    def state_dict(self) -> dict:
        return {"saved_in": DCP_DIR}

    def load_state_dict(self, state: dict) -> None:
        pass


def load_one_process_optimizer_state(path: Path, optimizer: torch.optim.Optimizer) -> None:
    """Load a single-process `optimizer.state_dict()` (saved in training_state.pt) into the sharded one.

    Both optimizers list the trainable parameters in the same order (`select_trainable`'s), so the
    saved integer ids map one to one; each full state tensor is cut to the local shard of its parameter.
    """
    from torch.distributed.tensor import DTensor

    from ftcore.distributed.fsdp import shard_like

    saved = torch.load(path, map_location="cpu", weights_only=True)["optimizer"]
    check_optimizer_state_kind(saved, optimizer, path.parent)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, values in saved["state"].items():
        param = params[index]
        state[index] = {
            key: shard_like(param, value)
            if isinstance(param, DTensor) and torch.is_tensor(value) and value.shape == param.shape
            else value
            for key, value in values.items()
        }
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


# ---- bringing sharded weights back ---------------------------------------------------------------
def unsharded_replica(model_cfg: DictConfig, dtype: torch.dtype, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain model (on rank 0, CPU) holding `state` gathered from the shards; tensors not in `state`
    stay on the meta device. The exporters (PEFT adapter, merged weights) read it as they read a
    single-process model. An NF4 base comes back as its bf16 weight, so the replica holds a float base."""
    from ftcore.runner.setup import default_dtype

    node = copy.deepcopy(model_cfg)
    if "quantize_base" in node:
        node.quantize_base = False
    with default_dtype(dtype), torch.device("meta"):
        replica = instantiate(node)
    replica.load_state_dict(state, strict=False, assign=True)
    return replica
