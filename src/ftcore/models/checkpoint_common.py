"""Pieces every checkpointer shares: which keys a model expects from a checkpoint, copying one
tensor into a materialized model with clear errors, and atomic output folders."""

from __future__ import annotations

import math

import torch
from torch import nn

from ftcore.training.checkpoint_io import atomic_write_dir as atomic_directory  # noqa: F401  (one implementation)

# Adapter parameters of LoRALinear (docs/architecture.md) are never in a base checkpoint: they are
# initialized by the model (or loaded from an adapter file), so they are not "missing".
_ADAPTER_MARKERS = (".lora_a.", ".lora_b.")
_ADAPTER_SUFFIXES = (".magnitude",)
# NF4Linear's buffers besides the packed codes (ftcore.modules.nf4.nf4_buffer_shapes)
_NF4_SIDE_BUFFERS = (".weight_absmax", ".weight_nested_absmax", ".weight_offset")


def is_adapter_key(key: str) -> bool:
    return any(marker in key for marker in _ADAPTER_MARKERS) or key.endswith(_ADAPTER_SUFFIXES)


def expected_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Every base-model tensor a checkpoint must provide, with its logical shape.

    Read from the state dict in NF4 mode with `keep_vars` (references, no dequantized copies):
    an NF4 weight appears there as its packed buffers, which stand for one float `weight` of
    shape (out, 2 * packed columns)."""
    from ftcore.modules.nf4 import nf4_state_dict_mode

    with nf4_state_dict_mode("nf4"):
        state = model.state_dict(keep_vars=True)
    shapes = {}
    for key, tensor in state.items():
        if is_adapter_key(key) or key.endswith(_NF4_SIDE_BUFFERS):
            continue
        if key.endswith(".weight_packed"):
            shapes[key[: -len("_packed")]] = torch.Size((tensor.shape[0], tensor.shape[1] * 2))
        else:
            shapes[key] = tensor.shape
    return shapes


class TensorLoader:
    """Copies tensors one at a time into a materialized model and keeps track of what it has seen,
    so that a checkpoint is streamed without a second full copy in memory."""

    def __init__(self, model: nn.Module, source: str):
        self.model = model
        self.source = source
        self.expected = expected_shapes(model)
        self.loaded: set[str] = set()

    def load(self, key: str, tensor: torch.Tensor, source_key: str | None = None) -> None:
        origin = f"tensor {source_key!r} (ftcore name {key!r})" if source_key else f"tensor {key!r}"
        if key not in self.expected:
            raise ValueError(
                f"unexpected {origin} in {self.source}: the model has no such parameter; "
                "check that the model builder matches the checkpoint (family, size, tied embeddings)"
            )
        if tuple(tensor.shape) != tuple(self.expected[key]):
            raise ValueError(
                f"shape mismatch for {origin} in {self.source}: checkpoint has {tuple(tensor.shape)}, "
                f"model expects {tuple(self.expected[key])}; check the model size in the config"
            )
        module_name, _, leaf = key.rpartition(".")
        module = self.model.get_submodule(module_name) if module_name else self.model
        # The owning module's load_state_dict runs its own hooks, so an NF4 layer quantizes here.
        module.load_state_dict({leaf: tensor}, strict=False)
        self.loaded.add(key)

    def load_bnb_4bit(self, key: str, entries: dict[str, torch.Tensor], source_key: str) -> None:
        """A pre-quantized bitsandbytes weight: `entries` holds `key` (the packed bytes) and its
        `key.absmax`, `key.quant_map`, ... entries, which the NF4 layer takes as they are, together."""
        origin = f"4-bit tensor {source_key!r} (ftcore name {key!r})"
        if key not in self.expected:
            raise ValueError(f"unexpected {origin} in {self.source}: the model has no such parameter")
        module_name, _, leaf = key.rpartition(".")
        module = self.model.get_submodule(module_name)
        if not (getattr(module, "quantize_base", False) or hasattr(module, "weight_packed")):
            raise ValueError(
                f"{origin} in {self.source} is pre-quantized by bitsandbytes (bnb-4bit), but this layer holds "
                "a float weight; set model.quantize_base=true (QLoRA), or load the model's bf16 checkpoint"
            )
        packed_weights, expected = entries[key].numel() * 2, math.prod(self.expected[key])
        if packed_weights != expected:
            raise ValueError(
                f"shape mismatch for {origin} in {self.source}: it packs {packed_weights} weights, the model "
                f"expects {tuple(self.expected[key])}; check the model size in the config"
            )
        prefix = f"{module_name}."
        module.load_state_dict({k[len(prefix) :]: v for k, v in entries.items()}, strict=False)
        self.loaded.add(key)

    def finish(self) -> None:
        missing = sorted(set(self.expected) - self.loaded)
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise ValueError(
                f"{self.source} is missing {len(missing)} tensor(s) the model needs: {shown}; "
                "check that the model builder matches the checkpoint"
            )


def interleaved_to_halves(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute q/k projection rows from Meta's interleaved RoPE layout (pairs (2i, 2i+1) rotate
    together) to the HF rotate-half layout (pairs (i, i + head_dim/2)).

    weight: (n_heads * head_dim, in_dim) -> same shape."""
    out_dim, in_dim = weight.shape
    head_dim = out_dim // n_heads
    pairs = weight.reshape(n_heads, head_dim // 2, 2, in_dim)  # (heads, pair i, member, in)
    return pairs.transpose(1, 2).reshape(out_dim, in_dim)  # (heads, member, pair i, in)


def halves_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `interleaved_to_halves`: rotate-half rows -> Meta's interleaved rows."""
    out_dim, in_dim = weight.shape
    head_dim = out_dim // n_heads
    halves = weight.reshape(n_heads, 2, head_dim // 2, in_dim)  # (heads, half, i, in)
    return halves.transpose(1, 2).reshape(out_dim, in_dim)  # (heads, i, half, in)
