"""Build a run's parts from its config: device, dtype, model, data loaders."""

from __future__ import annotations

import contextlib
import logging
import random
from typing import cast

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from ftcore.config import instantiate
from ftcore.runner.sampler import ResumableSampler

log = logging.getLogger("ftcore")

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def resolve_device(name: str) -> torch.device:
    """`cpu`, `cuda`, `cuda:N` or `auto` (CUDA when present). Under torchrun, `cuda` means this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:  # torch lists every device type it knows; name the key instead
        raise ValueError(f"config key `device` is {name!r}; use cpu, cuda, cuda:N or auto") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("config key `device` is 'cuda' but no CUDA GPU is visible; set device=cpu")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"config key `dtype` is {name!r}; use one of {sorted(_DTYPES)}")
    dtype = _DTYPES[name]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("dtype=bf16 is not supported on this GPU; set dtype=fp32")
    return dtype


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(
    model_cfg: DictConfig, device: torch.device, dtype: torch.dtype, checkpointer=None, seed: int = 0
):
    """Build on the meta device (no memory), materialize once on `device`, then stream weights in.

    Modules that hold quantized weights (NF4) pick their own storage dtypes, so the float dtype is set
    as the default while building rather than by casting the finished model. With a checkpointer the
    LoRA adapters, which no base checkpoint holds, are drawn from `seed` as a sharded run draws them.
    """
    from ftcore.models import init_weights

    with default_dtype(dtype), torch.device("meta"):
        model = instantiate(model_cfg)
    model.to_empty(device=device)
    with torch.no_grad():
        init_weights(model)
    if checkpointer is not None:
        draw_adapters_from_seed(model, seed)
        checkpointer.load_into(model)
    # DoRA's magnitude is the norm of the loaded base weight's rows, so it is set only now.
    for module in model.modules():
        if getattr(module, "use_dora", False):
            module.initialize_dora_magnitude()
    return model


class _FullAdapter(torch.nn.Module):
    """Full-size stand-ins for one LoRALinear's adapter factors, to run its own init rule on."""

    def __init__(self, in_dim: int, out_dim: int, rank: int):
        super().__init__()
        self.lora_a = torch.nn.Linear(in_dim, rank, bias=False)
        self.lora_b = torch.nn.Linear(rank, out_dim, bias=False)


@torch.no_grad()
def draw_adapters_from_seed(model: torch.nn.Module, seed: int) -> None:
    """Draw every LoRA adapter as full fp32 CPU tensors from `seed` alone, the global RNG untouched, so
    that 1 process and N ranks (whose load hooks cut each tensor to the rank's shard), CPU or CUDA,
    start from the same adapters; a random init of the base before it would shift the draw otherwise."""
    from ftcore.modules.lora import LoRALinear, lora_modules

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _, module in lora_modules(model):
            full = _FullAdapter(module.in_dim, module.out_dim, module.rank)
            LoRALinear.reset_lora_parameters(cast(LoRALinear, full))  # duck-typed: touches lora_a/b only
            module.load_state_dict(full.state_dict(), strict=False)


def build_loader(
    dataset, collate_fn, batch_size: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1,
    name: str = "dataset", training: bool = True,
):  # fmt: skip
    """A DataLoader over `dataset` with a resumable, rank-sharded sampler; returns (loader, sampler).

    Training drops an incomplete last batch (every step has the same size); validation keeps it.
    """
    if training and len(dataset) < batch_size * world_size:
        raise ValueError(
            f"config key `{name}`: the dataset has {len(dataset)} samples, fewer than one batch "
            f"(batch_size={batch_size} x {world_size} ranks); lower batch_size or add data"
        )
    sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    # A private generator: creating a DataLoader iterator draws a seed, and drawing it from the global
    # RNG would shift dropout's random stream after a resume.
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        drop_last=training,
        generator=generator,
    )
    return loader, sampler
