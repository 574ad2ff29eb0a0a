"""NF4 weights and the frozen NF4 linear layer (QLoRA's base), bitsandbytes-compatible bytes.

API for other modules (LoRALinear with `quantize_base=True` uses exactly this):

    w = to_nf4(weight)                      # NF4Weight from a float (out, in) tensor, quantized on its device
    w = to_nf4(cpu_weight, device="cuda")   # moved and quantized a chunk of rows at a time
    y = nf4_linear(x, w, bias)              # x (..., in) -> (..., out); grads flow to x (and bias) only
    w.dequantize(torch.bfloat16)            # back to float, e.g. for merging adapters
    NF4Linear(in_dim, out_dim)              # a module holding the NF4 parts as buffers

A QLoRA LoRALinear should hold its base as a child `NF4Linear` (or the same four buffers created with
`nf4_buffer_shapes`) and compute `base(x) + lora_b(lora_a(dropout(x))) * scale`. Holding an
`NF4Linear` gives it, for free: quantize-on-load of a float `weight` (one tensor at a time, on the
device the module lives on), loading of pre-quantized bitsandbytes checkpoints, and a state dict that
writes bf16 `weight` by default or the NF4 parts inside `nf4_state_dict_mode("nf4")`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import torch
from torch import nn

from ftcore import kernels
from ftcore.kernels import nf4_bnb, nf4_reference
from ftcore.kernels.nf4_reference import NESTED_BLOCK_SIZE, NF4_BLOCK_SIZE, NF4Parts

__all__ = [
    "NF4Weight",
    "NF4Linear",
    "to_nf4",
    "random_nf4",
    "nf4_linear",
    "nf4_state_dict_mode",
    "nf4_buffer_shapes",
    "load_bnb_4bit_state",
]

_STATE_DICT_MODES = ("bf16", "nf4")
_state_dict_mode = contextvars.ContextVar("nf4_state_dict_mode", default="bf16")
_BUFFERS = ("weight_packed", "weight_absmax", "weight_nested_absmax", "weight_offset")


class NF4Weight(NF4Parts):
    """A weight stored as NF4 (double-quantized, bitsandbytes' layout)."""

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return kernels.dequantize_nf4(self, dtype)

    def to(self, device: torch.device | str) -> NF4Weight:
        move: Callable[[torch.Tensor | None], Any] = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4Weight(
            move(self.packed), move(self.absmax), move(self.nested_absmax), move(self.offset),
            self.shape, self.dtype, self.block_size,
        )  # fmt: skip

    @property
    def device(self) -> torch.device:
        return self.packed.device


# Weights quantized per step: 8M (16 MiB in bf16). Quantizing a whole projection at once would add it in
# full plus its float32 temporaries to the device (Llama-3.1-8B's gate: 112 MiB bf16, 224 MiB fp32).
QUANTIZE_CHUNK_WEIGHTS = 1 << 23


def to_nf4(
    weight: torch.Tensor,
    block_size: int = NF4_BLOCK_SIZE,
    device: torch.device | str | None = None,
    chunk_weights: int = QUANTIZE_CHUNK_WEIGHTS,
) -> NF4Weight:
    """Quantize a float tensor (double quantization on) on `device` (default: where it lives): Triton on
    CUDA, reference elsewhere. A weight on another device (a checkpoint's, on the host) moves a chunk of
    rows at a time, so the device never holds it whole; the bytes equal one whole-tensor quantization."""
    target = weight.device if device is None else torch.device(device)
    chunks = _row_chunks(weight, block_size, chunk_weights)
    return quantize_row_chunks(chunks, weight.shape, weight.dtype, target, block_size)


def random_nf4(
    out_dim: int,
    in_dim: int,
    std: float,
    device: torch.device | str,
    chunk_weights: int = QUANTIZE_CHUNK_WEIGHTS // 2,  # drawn in float32: the bytes of a loading chunk
) -> NF4Weight:
    """A normal(0, std) (out_dim, in_dim) weight drawn and quantized a chunk of rows at a time on `device`."""
    rows = _rows_per_chunk(out_dim, in_dim, NF4_BLOCK_SIZE, chunk_weights)
    chunks = (
        torch.randn(min(rows, out_dim - start), in_dim, device=device).mul_(std)
        for start in range(0, out_dim, rows)
    )
    shape = torch.Size((out_dim, in_dim))
    return quantize_row_chunks(chunks, shape, torch.float32, torch.device(device), NF4_BLOCK_SIZE)


def _row_chunks(weight: torch.Tensor, block_size: int, chunk_weights: int) -> Iterator[torch.Tensor]:
    """Consecutive slices along dim 0, each a whole number of NF4 blocks (else the weight as one chunk)."""
    if weight.dim() < 2 or weight.shape[0] == 0:
        yield weight
        return
    rows = _rows_per_chunk(weight.shape[0], math.prod(weight.shape[1:]), block_size, chunk_weights)
    for start in range(0, weight.shape[0], rows):
        yield weight[start : start + rows]


def _rows_per_chunk(n_rows: int, row_weights: int, block_size: int, chunk_weights: int) -> int:
    """Rows quantized per step: about `chunk_weights` weights, or all rows when a row is not a whole
    number of blocks (a slice between rows would then split a block)."""
    if row_weights % block_size:
        return max(1, n_rows)
    return max(1, chunk_weights // row_weights)


def quantize_row_chunks(
    chunks: Iterable[torch.Tensor],
    shape: torch.Size,
    dtype: torch.dtype,
    device: torch.device,
    block_size: int,
) -> NF4Weight:
    """NF4 of the tensor that `chunks` (consecutive, whole blocks each) concatenate to, quantized on `device`.

    Blocks are quantized independently, so each chunk gets its packed codes and float32 absmax on its own;
    double quantization (the absmax mean and 256-blocks) then runs once over the whole absmax vector."""
    numel = math.prod(shape)
    packed = torch.empty(numel // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(numel // block_size, dtype=torch.float32, device=device)
    start = 0
    for chunk in chunks:
        part = kernels.quantize_nf4(chunk.to(device), block_size=block_size, double_quant=False)
        end = start + chunk.numel()
        packed[start // 2 : end // 2] = part.packed.view(-1)
        absmax[start // block_size : end // block_size] = part.absmax
        start = end
    if start != numel:
        raise ValueError(f"quantize_row_chunks got {start} weights for a tensor of shape {tuple(shape)}")
    q_absmax, nested_absmax, offset = nf4_reference.double_quantize_absmax(absmax)
    return NF4Weight(packed, q_absmax, nested_absmax, offset, shape, dtype, block_size)


def load_bnb_4bit_state(key: str, state_dict: dict[str, torch.Tensor]) -> NF4Weight:
    """NF4Weight from the entries a pre-quantized `bnb-4bit` checkpoint stores for weight `key`."""
    return NF4Weight(**vars(nf4_bnb.load_bnb_4bit_state(key, state_dict)))


def nf4_linear(x: torch.Tensor, w_nf4: NF4Parts, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ W^T + bias with W = w_nf4 (out, in); differentiable w.r.t. x and bias only."""
    return kernels.nf4_linear(x, w_nf4, bias)


@contextlib.contextmanager
def nf4_state_dict_mode(mode: str):
    """Within the block, NF4Linear.state_dict() writes `mode`: "bf16" (a float `weight`) or "nf4" (the parts)."""
    if mode not in _STATE_DICT_MODES:
        raise ValueError(f"nf4_state_dict_mode got {mode!r}; use one of {_STATE_DICT_MODES}")
    token = _state_dict_mode.set(mode)
    try:
        yield
    finally:
        _state_dict_mode.reset(token)


def nf4_buffer_shapes(out_dim: int, in_dim: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the NF4 buffers of an (out_dim, in_dim) weight: packed bytes, absmax codes, nested scales, offset."""
    if in_dim % NF4_BLOCK_SIZE != 0:
        raise ValueError(f"NF4Linear needs in_dim divisible by {NF4_BLOCK_SIZE}; got in_dim={in_dim}")
    n_blocks = out_dim * in_dim // NF4_BLOCK_SIZE
    return {
        "weight_packed": (out_dim, in_dim // 2),
        "weight_absmax": (out_dim, in_dim // NF4_BLOCK_SIZE),
        "weight_nested_absmax": (math.ceil(n_blocks / NESTED_BLOCK_SIZE),),
        "weight_offset": (),
    }


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4; forward is `nf4_linear`.

    Buffers (shapes from the dims alone, so a model built on the meta device can `to_empty`):
    weight_packed uint8 (out, in/2), weight_absmax uint8 (out, in/64), weight_nested_absmax fp32,
    weight_offset fp32 (). Loading a float `weight` quantizes it; `dtype` is the compute/save dtype.
    """

    weight_packed: torch.Tensor  # registered buffers (parameters once sharded: nf4_sharding)
    weight_absmax: torch.Tensor
    weight_nested_absmax: torch.Tensor
    weight_offset: torch.Tensor

    def __init__(self, in_dim: int, out_dim: int, bias: bool = False, device=None, dtype=torch.bfloat16):
        super().__init__()
        self.in_dim, self.out_dim, self.dtype = in_dim, out_dim, dtype
        self.state_dict_mode: str | None = None  # None: follow nf4_state_dict_mode(); else "bf16"/"nf4"
        for name, shape in nf4_buffer_shapes(out_dim, in_dim).items():
            buffer_dtype = torch.uint8 if name in ("weight_packed", "weight_absmax") else torch.float32
            self.register_buffer(name, torch.zeros(shape, dtype=buffer_dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_dim, device=device, dtype=dtype)) if bias else None

    @property
    def weight_nf4(self) -> NF4Weight:
        return NF4Weight(
            self.weight_packed.view(-1), self.weight_absmax.view(-1), self.weight_nested_absmax,
            self.weight_offset, torch.Size((self.out_dim, self.in_dim)), self.dtype,
        )  # fmt: skip

    def set_weight(self, weight: NF4Parts | torch.Tensor) -> None:
        """Store a float weight (quantized here, on this module's device) or ready NF4 parts."""
        if isinstance(weight, torch.Tensor):
            if tuple(weight.shape) != (self.out_dim, self.in_dim):
                raise ValueError(
                    f"NF4Linear expects weight {(self.out_dim, self.in_dim)}, got {tuple(weight.shape)}"
                )
            weight = to_nf4(weight, device=self.weight_packed.device)
        if not weight.double_quant or tuple(weight.shape) != (self.out_dim, self.in_dim):
            raise ValueError(f"NF4Linear needs double-quantized parts of shape {(self.out_dim, self.in_dim)}")
        with torch.no_grad():
            for name, value in zip(
                _BUFFERS, (weight.packed, weight.absmax, weight.nested_absmax, weight.offset)
            ):
                buffer = getattr(self, name)
                buffer.copy_(cast(torch.Tensor, value).reshape(buffer.shape))  # double_quant: all set

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.weight_nf4, self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        mode = self.state_dict_mode or _state_dict_mode.get()
        if mode == "nf4":
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.weight_nf4.dequantize(self.dtype)
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ):
        # Turn a float `weight` or a bitsandbytes 4-bit entry set into our buffers, one tensor at a time.
        key = prefix + "weight"
        if key in state_dict and nf4_bnb.is_bnb_4bit_state(key, state_dict):
            parts = load_bnb_4bit_state(key, state_dict).to(self.weight_packed.device)
            for bnb_key in nf4_bnb.bnb_4bit_keys(key, state_dict):
                del state_dict[bnb_key]
            self.set_weight(parts)
            self._mark_buffers_loaded(state_dict, prefix)
        elif key in state_dict:
            self.set_weight(state_dict.pop(key))
            self._mark_buffers_loaded(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )

    def _mark_buffers_loaded(self, state_dict, prefix):
        # The buffers are already filled; handing them back to the default loader keeps strict checks happy.
        for name in _BUFFERS:
            state_dict[prefix + name] = getattr(self, name)

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, out_dim={self.out_dim}, bias={self.bias is not None}, dtype={self.dtype}"
        )
