"""NF4 (QLoRA's 4-bit NormalFloat) in readable PyTorch: the reference every fast kernel must equal bit for bit.

The format is bitsandbytes' `quantize_4bit(quant_type="nf4", compress_statistics=True)` (QLoRA, arXiv
2305.14314), byte for byte:

* the weight is flattened row-major and cut into blocks of 64; each block keeps its absmax (fp32);
* every value is multiplied by the reciprocal of its block's absmax and rounded to the nearest of the 16
  NF4 code values by comparing against the fp32 midpoints between neighbouring codes (`x > midpoint`
  picks the upper code, so a value exactly on a midpoint takes the lower one);
* two 4-bit codes share a byte, the FIRST element of each pair in the HIGH nibble;
* double quantization: the absmax vector minus its mean (`offset`) is quantized to 8 bits in blocks of
  256 with bitsandbytes' signed dynamic 8-bit code; each 256-block keeps its own fp32 absmax
  (`nested_absmax`). Storage: 4 bits + 8/64 + 32/(64*256) bits = ~4.127 bits per weight.

Dequantization: absmax = dynamic_code[q8] * nested_absmax + offset (two fp32 roundings, no fused
multiply-add), weight = (NF4_CODE[q4] * absmax) rounded once to the output dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import cast

import torch

# The 16 NF4 values, exactly as bitsandbytes' CUDA table stores them (fp32): quantiles of N(0, 1) with an
# exact zero, normalised to [-1, 1] (QLoRA appendix).
NF4_CODE_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NF4_BLOCK_SIZE = 64
NESTED_BLOCK_SIZE = 256


@dataclass
class NF4Parts:
    """The stored pieces of one NF4 tensor (bitsandbytes' layout)."""

    packed: torch.Tensor  # uint8 (numel // 2,): two codes per byte, first element in the high nibble
    absmax: torch.Tensor  # uint8 (n_blocks,) with double quant, else fp32 (n_blocks,)
    nested_absmax: torch.Tensor | None  # fp32 (ceil(n_blocks / 256),) with double quant
    offset: torch.Tensor | None  # fp32 0-dim: the mean of the fp32 absmax vector, with double quant
    shape: torch.Size
    dtype: torch.dtype
    block_size: int = NF4_BLOCK_SIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """(16,) fp32 NF4 code values."""
    return torch.tensor(NF4_CODE_VALUES, dtype=torch.float32, device=device)


def nf4_thresholds(device: torch.device | str = "cpu") -> torch.Tensor:
    """(15,) fp32 midpoints between neighbouring codes: bitsandbytes' decision-tree constants."""
    code64 = torch.tensor(NF4_CODE_VALUES, dtype=torch.float64)
    return ((code64[:-1] + code64[1:]) / 2).to(torch.float32).to(device)


@functools.lru_cache(maxsize=1)
def _dynamic_map_cpu() -> torch.Tensor:
    # Signed dynamic 8-bit code (Dettmers, arXiv 1511.04561) with 7 exponent steps: for exponent i in
    # 0..6 there are 2**i linear fraction steps; each value is the mean of two neighbouring points of
    # linspace(0.1, 1, 2**i + 1) (fp32), scaled by 10**(i - 6), with both signs; plus 0 and 1.0.
    # 2 * 127 + 2 = 256 values, sorted ascending. Built with the same fp32 torch ops as bitsandbytes.
    values: list[float] = []
    for exponent in range(7):
        boundaries = torch.linspace(0.1, 1, 2**exponent + 1)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (exponent - 6)
        values += (scale * means).tolist()
        values += (-scale * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """(256,) fp32 signed dynamic 8-bit code used for the double-quantized absmax."""
    return _dynamic_map_cpu().to(device)


def _dynamic_code_index(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Nearest entry of the sorted 256-entry `code` for each fp32 `x`, as bitsandbytes' CUDA kernel finds it.

    Its 7-step binary search decides ties by the path taken, so it is replayed step by step here
    (vectorised) rather than replaced by an argmin that could break ties differently.
    """
    pivot = torch.full_like(x, 127, dtype=torch.long)
    lower_pivot, upper_pivot = torch.zeros_like(pivot), torch.full_like(pivot, 255)
    lower, upper = torch.full_like(x, -1.0), torch.full_like(x, 1.0)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        go_up = x > val
        lower_pivot, lower = torch.where(go_up, pivot, lower_pivot), torch.where(go_up, val, lower)
        upper_pivot, upper = torch.where(go_up, upper_pivot, pivot), torch.where(go_up, upper, val)
        pivot = torch.where(go_up, pivot + step, pivot - step)
        val = code[pivot]
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    take_upper = x > (upper + val) * 0.5
    take_lower = x < (lower + val) * 0.5
    above = torch.where(take_upper, upper_pivot, pivot)
    below = torch.where(take_lower, lower_pivot, pivot)
    return torch.where(x > val, above, below).to(torch.uint8)


_CODE_SEARCH_SLICE = 1 << 18


def quantize_blockwise_8bit(
    x: torch.Tensor, block_size: int = NESTED_BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (n,) -> (uint8 codes (n,), fp32 absmax (ceil(n / block_size),)) with the dynamic 8-bit code."""
    n = x.numel()
    n_blocks = -(-n // block_size)
    padded = torch.zeros(n_blocks * block_size, dtype=torch.float32, device=x.device)
    padded[:n] = x.reshape(-1)
    blocks = padded.view(
        n_blocks, block_size
    )  # (n_blocks, block_size); zero padding leaves each max unchanged
    absmax = blocks.abs().amax(dim=1)
    # reciprocal then multiply, as bitsandbytes does
    scaled = (blocks * torch.reciprocal(absmax)[:, None]).view(-1)
    code, codes = dynamic_map(x.device), torch.empty(scaled.shape, dtype=torch.uint8, device=x.device)
    # The search keeps ~10 int64/fp32 temporaries per value: in slices, they stay a few MiB while loading.
    for start in range(0, scaled.numel(), _CODE_SEARCH_SLICE):
        codes[start : start + _CODE_SEARCH_SLICE] = _dynamic_code_index(
            scaled[start : start + _CODE_SEARCH_SLICE], code
        )
    return codes[:n], absmax


def dequantize_blockwise_8bit(
    codes: torch.Tensor, absmax: torch.Tensor, block_size: int = NESTED_BLOCK_SIZE
) -> torch.Tensor:
    """Inverse of `quantize_blockwise_8bit`: fp32 (n,)."""
    scale = absmax.repeat_interleave(block_size)[: codes.numel()]
    return dynamic_map(codes.device)[codes.long()] * scale


def nf4_code_index(scaled: torch.Tensor) -> torch.Tensor:
    """Code index 0..15 for values already divided by their absmax: the number of midpoints below x.

    NaN (a block that is all zeros gives 0 * inf) compares false everywhere and gets code 0, as in
    bitsandbytes; it dequantizes to -1.0 * 0 = 0.
    """
    index = torch.bucketize(scaled, nf4_thresholds(scaled.device), right=False)
    return torch.where(torch.isnan(scaled), 0, index).to(torch.uint8)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (2k,) -> bytes (k,), element 2i in the high nibble, 2i+1 in the low nibble."""
    pairs = codes.view(-1, 2)  # (k, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """bytes (k,) -> uint8 codes (2k,) in element order."""
    return torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(-1)  # (k, 2) -> (2k,)


def check_quantizable(w: torch.Tensor, block_size: int) -> None:
    if not w.is_floating_point():
        raise ValueError(
            f"NF4 quantizes floating-point weights; got dtype {w.dtype}. Cast it to bf16/fp32 first."
        )
    if w.numel() % block_size != 0:
        raise ValueError(
            f"NF4 needs the weight's element count to be a multiple of the block size {block_size}; "
            f"shape {tuple(w.shape)} has {w.numel()}. Keep such a layer in bf16 (leave it out of quantization)."
        )


def double_quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 absmax (n_blocks,) -> (uint8 (n_blocks,), nested_absmax fp32, offset fp32 0-dim)."""
    offset = absmax.mean()
    q_absmax, nested_absmax = quantize_blockwise_8bit(absmax - offset)
    return q_absmax, nested_absmax, offset


def quantize_nf4(w: torch.Tensor, block_size: int = NF4_BLOCK_SIZE, double_quant: bool = True) -> NF4Parts:
    """Quantize a float tensor of any shape to NF4 (bitsandbytes' bytes)."""
    check_quantizable(w, block_size)
    blocks = w.detach().reshape(-1, block_size).float()  # (n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks * torch.reciprocal(absmax)[:, None]
    packed = pack_nibbles(nf4_code_index(scaled).reshape(-1))
    if not double_quant:
        return NF4Parts(packed, absmax, None, None, w.shape, w.dtype, block_size)
    q_absmax, nested_absmax, offset = double_quantize_absmax(absmax)
    return NF4Parts(packed, q_absmax, nested_absmax, offset, w.shape, w.dtype, block_size)


def dequantize_absmax(parts: NF4Parts) -> torch.Tensor:
    """fp32 (n_blocks,) absmax, undoing the double quantization when there is one."""
    if not parts.double_quant:
        return parts.absmax.float()
    # double_quant: nested_absmax and offset are both set
    nested_absmax, offset = cast(torch.Tensor, parts.nested_absmax), cast(torch.Tensor, parts.offset)
    return dequantize_blockwise_8bit(parts.absmax, nested_absmax) + offset


def dequantize_nf4(parts: NF4Parts, dtype: torch.dtype | None = None) -> torch.Tensor:
    """NF4Parts -> tensor of `parts.shape` in `dtype` (default: the dtype it was quantized from)."""
    values = nf4_code(parts.packed.device)[unpack_nibbles(parts.packed).long()]
    weights = values.view(-1, parts.block_size) * dequantize_absmax(parts)[:, None]  # (n_blocks, block_size)
    return weights.to(dtype or parts.dtype).view(parts.shape)


def nf4_storage_bits_per_weight(parts: NF4Parts) -> float:
    """Bits stored per weight (packed codes + absmax + nested scales + offset)."""
    tensors = [parts.packed, parts.absmax, parts.nested_absmax, parts.offset]
    total_bytes = sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return 8.0 * total_bytes / parts.packed.numel() / 2
