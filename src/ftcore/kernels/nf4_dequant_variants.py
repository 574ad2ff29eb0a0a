"""Alternative layouts of the NF4 dequantize kernel, for the small weights (8B q/o 0.70, k/v 0.39 of HBM).

Selected by `nf4_triton.dequantize_nf4(..., variant=...)` so one benchmark call compares them:

* "tile" (nf4_triton's kernel): a (blocks, 32) tile of bytes per program, one 4-byte output word per byte.
* "words": the packed bytes read as int32 words; each word's 4 bytes decode into 4 consecutive output words
  held by the same thread, a (words, 4) tile, so every load is 4 bytes and every store 16 (32 for fp32)
  with no layout change between them. The absmax is decoded per word (8 words share a 64-block).
* "persistent": the "words" tile in a grid of `programs_per_sm` programs per SM, each looping over tiles
  with a software-pipelined loop (`stages` loads in flight): a small weight that is less than one wave
  of programs still keeps several loads in flight per SM.

All write exactly the reference's bits (same decode as nf4_triton: fp32 mul then add, one rounding).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ftcore.kernels import nf4_reference as ref
from ftcore.kernels.nf4_triton import _block_absmax, _output_bits

VARIANTS = ("tile", "words", "persistent")


@triton.jit
def _words_tile(tile, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, dynamic_ptr, pairs_ptr, n_words,
                WORDS: tl.constexpr, WORDS_PER_BLOCK: tl.constexpr, NESTED_BLOCK: tl.constexpr,
                DOUBLE_QUANT: tl.constexpr, OUT_FORMAT: tl.constexpr):  # fmt: skip
    # tile * WORDS < n_words + WORDS fits int32; the output index (x4 or x8 bytes) needs int64.
    word_ids = tl.arange(0, WORDS).to(tl.int64) + tile * WORDS  # (W,)
    mask = word_ids < n_words
    words = tl.load(packed_ptr + word_ids, mask=mask, other=0)  # int32: 4 packed bytes = 8 weights
    absmax = _block_absmax(
        absmax_ptr,
        nested_ptr,
        offset_ptr,
        dynamic_ptr,
        word_ids // WORDS_PER_BLOCK,
        mask,
        NESTED_BLOCK,
        DOUBLE_QUANT,
    )[:, None]  # fmt: skip  (W, 1)
    packed = (
        words[:, None] >> (8 * tl.arange(0, 4))[None, :]
    ) & 255  # (W, 4): little-endian, lowest byte first
    first = _output_bits(tl.load(code_ptr + (packed >> 4)) * absmax, OUT_FORMAT)  # element 2i: high nibble
    second = _output_bits(tl.load(code_ptr + (packed & 15)) * absmax, OUT_FORMAT)  # element 2i + 1
    pair = first | (second << (32 if OUT_FORMAT == 3 else 16))  # element 2i at the lower address
    out_ids = word_ids[:, None] * 4 + tl.arange(0, 4)[None, :]  # (W, 4): one output word per byte
    tl.store(pairs_ptr + out_ids, pair.to(pairs_ptr.dtype.element_ty, bitcast=True), mask=mask[:, None])


@triton.jit
def _dequantize_words_kernel(
    packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, dynamic_ptr, pairs_ptr, n_words, n_tiles,
    WORDS: tl.constexpr, WORDS_PER_BLOCK: tl.constexpr, NESTED_BLOCK: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr, OUT_FORMAT: tl.constexpr, PERSISTENT: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0), num_stages=STAGES):
            _words_tile(tile, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, dynamic_ptr, pairs_ptr,
                        n_words, WORDS, WORDS_PER_BLOCK, NESTED_BLOCK, DOUBLE_QUANT, OUT_FORMAT)  # fmt: skip
    else:
        _words_tile(tl.program_id(0), packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, dynamic_ptr,
                    pairs_ptr, n_words, WORDS, WORDS_PER_BLOCK, NESTED_BLOCK, DOUBLE_QUANT, OUT_FORMAT)  # fmt: skip


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def dequantize_words(
    parts: ref.NF4Parts, pairs: torch.Tensor, tables, out_format: int, *, persistent: bool,
    elements_per_program: int, num_warps: int, programs_per_sm: int = 4, stages: int = 3,
) -> None:  # fmt: skip
    """Launch the "words" / "persistent" kernel into `pairs` (the output viewed as one word per byte)."""
    if parts.block_size < 8 or parts.packed.numel() % 4 or parts.packed.data_ptr() % 4:
        raise ValueError(
            f"the '{'persistent' if persistent else 'words'}' dequantize reads 4-byte words: it needs a block "
            f"size >= 8 and a 4-byte aligned packed buffer; got block {parts.block_size}. Use variant='tile'."
        )
    words = parts.packed.reshape(-1).view(torch.int32)  # (bytes / 4,)
    tile_words = max(1, elements_per_program // 8)  # 8 weights per word
    n_tiles = triton.cdiv(words.numel(), tile_words)
    grid = min(n_tiles, programs_per_sm * _sm_count(words.device)) if persistent else n_tiles
    code, _, dynamic = tables
    absmax = parts.absmax.reshape(-1)
    nested = parts.nested_absmax if parts.double_quant else absmax  # unused without double quant
    offset = parts.offset if parts.double_quant else absmax
    _dequantize_words_kernel[(grid,)](
        words, absmax, nested, offset, code, dynamic, pairs, words.numel(), n_tiles,
        WORDS=tile_words, WORDS_PER_BLOCK=parts.block_size // 8, NESTED_BLOCK=ref.NESTED_BLOCK_SIZE,
        DOUBLE_QUANT=parts.double_quant, OUT_FORMAT=out_format, PERSISTENT=persistent, STAGES=stages,
        num_warps=num_warps, enable_fp_fusion=False,
    )  # fmt: skip
