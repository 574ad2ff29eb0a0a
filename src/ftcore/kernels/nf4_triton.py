"""Triton kernels for NF4: quantize and dequantize (the NF4 linear builds on the latter).

Bit-identical to `nf4_reference` (same fp32 reciprocal-then-multiply, same midpoint compares, same
nibble order, mul then add with no fused multiply-add when undoing the double quantization). They
run on CUDA tensors, and on CPU tensors under `TRITON_INTERPRET=1` (how the tests check them).

Dequantize is ONE kernel launch and nothing else on the stream: the absmax double-quant decode is fused
in (once per 64-block), the code tables live on the device once (`device_tables`), and nothing copies
from the host or synchronizes. A per-call `torch.tensor(...).to("cuda")` would be a blocking copy that
drains the GPU queue; that, not bandwidth, made the first version take ~0.15 ms at every size.

The second level of double quantization at quantize time (n / 64 absmax values, 1/64 of the data)
reuses the reference's vectorised torch code on the same device: the 8-bit binary search is tiny work
and sharing it keeps the two paths identical by construction.

The NF4 linear (`ftcore.kernels.nf4_linear`) at training shapes dequantizes the weight into a bf16 buffer
with `dequantize_nf4` and lets cuBLAS do the matmul: with thousands of tokens the matmul dominates and the
dequantize costs one read of 0.53 bytes and one write of 2 bytes per weight. At one token (decode) it runs
the GEMV of `nf4_gemv_triton` instead, which reads only the NF4 bytes (`kernels.nf4_matmul_path` decides).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ftcore.kernels import nf4_reference as ref

_QUANTIZE_BLOCKS_PER_PROGRAM = 16  # 64-weight blocks handled by one quantize program
# Dequantize: output elements per program and warps. 8192 elements = 128 blocks of 64 = 4 KiB in, 16 KiB out;
# `scripts/bench_nf4.py` sweeps the alternatives on the GPU.
DEQUANT_ELEMENTS_PER_PROGRAM = 8192
DEQUANT_NUM_WARPS = 4
# Kernel layout ("tile" here; "words"/"persistent" in nf4_dequant_variants): pick from bench_nf4's `dequant_variants`.
DEQUANT_VARIANT = "tile"
# The interpreter's float->bf16 cast truncates; there the kernel rounds on the bits instead (on the GPU
# the native cast is one cvt.rn instruction, checked bit for bit by scripts/gpu_nf4_checks.py).
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Output dtype -> the kernel's OUT_FORMAT (0 is bf16 rounded on the bits, for the interpreter).
_OUT_FORMATS = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}
_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def device_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(NF4 code (16,), NF4 midpoints (15,), dynamic 8-bit map (256,)) on `device`, built once per device."""
    device = torch.device(device)
    if device not in _TABLES:
        _TABLES[device] = (ref.nf4_code(device), ref.nf4_thresholds(device), ref.dynamic_map(device))
    return _TABLES[device]


@triton.jit
def _reciprocal(x, BNB_APPROX: tl.constexpr):
    # bitsandbytes builds with --use_fast_math, so its 1.0f/absmax is the approximate PTX reciprocal;
    # BNB_APPROX reproduces that on CUDA, otherwise the correctly rounded one (the reference's).
    if BNB_APPROX:
        return tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.math.div_rn(tl.full(x.shape, 1.0, tl.float32), x)


@triton.jit
def _code_index(scaled, thresholds_ptr):
    # Number of NF4 midpoints strictly below the value (NaN compares false: code 0), as the reference.
    index = tl.zeros(scaled.shape, dtype=tl.int32)
    for k in tl.static_range(15):
        index += (scaled > tl.load(thresholds_ptr + k)).to(tl.int32)
    return index


@triton.jit
def _quantize_nf4_kernel(
    w_ptr, packed_ptr, absmax_ptr, thresholds_ptr, n_blocks,
    BLOCK: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr, BNB_APPROX: tl.constexpr,
):  # fmt: skip
    block_ids = tl.program_id(0) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)  # (P,)
    pair_ids = tl.arange(0, BLOCK // 2)  # (BLOCK/2,)
    mask = (block_ids < n_blocks)[:, None]
    even_offsets = block_ids[:, None].to(tl.int64) * BLOCK + 2 * pair_ids[None, :]  # (P, BLOCK/2)
    first = tl.load(w_ptr + even_offsets, mask=mask, other=0.0).to(tl.float32)
    second = tl.load(w_ptr + even_offsets + 1, mask=mask, other=0.0).to(tl.float32)
    absmax = tl.maximum(tl.max(tl.abs(first), axis=1), tl.max(tl.abs(second), axis=1))  # (P,)
    inverse = _reciprocal(absmax, BNB_APPROX)[:, None]
    high = _code_index(first * inverse, thresholds_ptr)
    low = _code_index(second * inverse, thresholds_ptr)
    packed = ((high << 4) | low).to(tl.uint8)
    byte_offsets = block_ids[:, None].to(tl.int64) * (BLOCK // 2) + pair_ids[None, :]
    tl.store(packed_ptr + byte_offsets, packed, mask=mask)
    tl.store(absmax_ptr + block_ids, absmax, mask=block_ids < n_blocks)


@triton.jit
def _bf16_bits_round_nearest_even(x):
    # Round to nearest even on the bits: the Triton interpreter's cast truncates, so spelling it out keeps
    # the CPU-interpreted kernel bit-identical to torch's `.to(torch.bfloat16)`. Inputs are finite.
    bits = x.to(tl.uint32, bitcast=True)
    return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16


@triton.jit
def _output_bits(x, OUT_FORMAT: tl.constexpr):
    # fp32 values -> their bit patterns in the output dtype, widened to the pair word (uint32 or uint64).
    if OUT_FORMAT == 0:  # bf16, rounded on the bits (interpreter)
        return _bf16_bits_round_nearest_even(x)
    elif OUT_FORMAT == 1:  # bf16: the GPU's cvt.rn rounds to nearest even, as torch's cast does
        return x.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)
    elif OUT_FORMAT == 2:
        return x.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
    else:
        return x.to(tl.uint32, bitcast=True).to(tl.uint64)


@triton.jit
def _block_absmax(absmax_ptr, nested_ptr, offset_ptr, dynamic_ptr, block_ids, mask,
                  NESTED_BLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr):  # fmt: skip
    # One fp32 absmax per 64-block (P,), decoded once per block, not once per byte.
    if DOUBLE_QUANT:
        q_absmax = tl.load(absmax_ptr + block_ids, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_ptr + block_ids // NESTED_BLOCK, mask=mask, other=0.0)
        # Launched with enable_fp_fusion=False: mul and add round separately, like the reference.
        return tl.load(dynamic_ptr + q_absmax) * nested + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + block_ids, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _dequantize_nf4_kernel(
    packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, dynamic_ptr, pairs_ptr, n_blocks,
    BLOCK: tl.constexpr, NESTED_BLOCK: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr, OUT_FORMAT: tl.constexpr,
):  # fmt: skip
    # One program: BLOCKS_PER_PROGRAM whole 64-blocks, a (P, BLOCK/2) tile of bytes. Each byte's two output
    # values go out as ONE word (`pairs_ptr` is the output viewed as int32, or int64 for fp32), so loads and
    # stores share one layout: wide vector accesses, no interleaving shuffle.
    block_ids = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)  # (P,)
    mask = block_ids < n_blocks
    byte_ids = block_ids[:, None] * (BLOCK // 2) + tl.arange(0, BLOCK // 2)[None, :]  # (P, BLOCK/2)
    packed = tl.load(packed_ptr + byte_ids, mask=mask[:, None], other=0).to(tl.int32)
    absmax = _block_absmax(absmax_ptr, nested_ptr, offset_ptr, dynamic_ptr, block_ids, mask,
                           NESTED_BLOCK, DOUBLE_QUANT)[:, None]  # fmt: skip
    # The 16-entry code table is one 64-byte line: every lookup hits L1. Nibbles are 0..15, no mask needed.
    first = _output_bits(tl.load(code_ptr + (packed >> 4)) * absmax, OUT_FORMAT)  # high nibble: element 2i
    second = _output_bits(tl.load(code_ptr + (packed & 15)) * absmax, OUT_FORMAT)  # low nibble: 2i + 1
    # Little-endian: element 2i sits at the lower address, the low half of the word.
    word = first | (second << (32 if OUT_FORMAT == 3 else 16))
    tl.store(pairs_ptr + byte_ids, word.to(pairs_ptr.dtype.element_ty, bitcast=True), mask=mask[:, None])


def quantize_nf4(
    w: torch.Tensor, block_size: int = ref.NF4_BLOCK_SIZE, double_quant: bool = True, bnb_approx: bool = False
) -> ref.NF4Parts:
    """Triton twin of `nf4_reference.quantize_nf4`. `bnb_approx` mimics bitsandbytes' fast-math reciprocal (CUDA only)."""
    ref.check_quantizable(w, block_size)
    _check_power_of_two(block_size)
    flat = w.detach().contiguous().view(-1)
    n_blocks = flat.numel() // block_size
    packed = torch.empty(flat.numel() // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=w.device)
    grid = (triton.cdiv(n_blocks, _QUANTIZE_BLOCKS_PER_PROGRAM),)
    _quantize_nf4_kernel[grid](
        flat, packed, absmax, device_tables(w.device)[1], n_blocks,
        BLOCK=block_size, BLOCKS_PER_PROGRAM=_QUANTIZE_BLOCKS_PER_PROGRAM, BNB_APPROX=bnb_approx,
    )  # fmt: skip
    if not double_quant:
        return ref.NF4Parts(packed, absmax, None, None, w.shape, w.dtype, block_size)
    q_absmax, nested_absmax, offset = ref.double_quantize_absmax(absmax)
    return ref.NF4Parts(packed, q_absmax, nested_absmax, offset, w.shape, w.dtype, block_size)


def dequantize_nf4(
    parts: ref.NF4Parts,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    *,
    elements_per_program: int = DEQUANT_ELEMENTS_PER_PROGRAM,
    num_warps: int = DEQUANT_NUM_WARPS,
    variant: str = DEQUANT_VARIANT,
    programs_per_sm: int = 4,
) -> torch.Tensor:
    """Triton twin of `nf4_reference.dequantize_nf4`: one kernel launch, optionally into a preallocated `out`.

    `elements_per_program` (a power of two >= the block size), `num_warps`, `variant` (a layout from
    `nf4_dequant_variants.VARIANTS`) and `programs_per_sm` (persistent only) change speed, never values.
    """
    _check_power_of_two(parts.block_size)
    device = parts.packed.device
    out = _output_buffer(parts, dtype, out)
    out_format = 0 if out.dtype == torch.bfloat16 and _INTERPRETED else _OUT_FORMATS[out.dtype]
    pairs = out.view(-1).view(torch.int64 if out.dtype == torch.float32 else torch.int32)  # a word per byte
    if variant != "tile":
        from ftcore.kernels import nf4_dequant_variants as variants  # imports this module: no cycle at load

        if variant not in variants.VARIANTS:
            raise ValueError(f"dequantize_nf4 variant must be one of {variants.VARIANTS}; got {variant!r}")
        variants.dequantize_words(
            parts, pairs, device_tables(device), out_format, persistent=variant == "persistent",
            elements_per_program=elements_per_program, num_warps=num_warps, programs_per_sm=programs_per_sm,
        )  # fmt: skip
        return out
    n_blocks = parts.packed.numel() * 2 // parts.block_size
    blocks_per_program = max(1, elements_per_program // parts.block_size)
    code, _, dynamic = device_tables(device)
    absmax = parts.absmax.reshape(-1)
    nested = parts.nested_absmax if parts.double_quant else absmax  # unused without double quant
    offset = parts.offset if parts.double_quant else absmax
    _dequantize_nf4_kernel[(triton.cdiv(n_blocks, blocks_per_program),)](
        parts.packed.reshape(-1), absmax, nested, offset, code, dynamic, pairs, n_blocks,
        BLOCK=parts.block_size, NESTED_BLOCK=ref.NESTED_BLOCK_SIZE, BLOCKS_PER_PROGRAM=blocks_per_program,
        DOUBLE_QUANT=parts.double_quant, OUT_FORMAT=out_format, num_warps=num_warps,
        enable_fp_fusion=False,
    )  # fmt: skip
    return out


def _output_buffer(parts: ref.NF4Parts, dtype: torch.dtype | None, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        out = torch.empty(parts.shape, dtype=dtype or parts.dtype, device=parts.packed.device)
    n = parts.packed.numel() * 2
    if not out.is_contiguous() or out.numel() != n or out.device != parts.packed.device:
        raise ValueError(
            f"dequantize_nf4 `out` must be a contiguous tensor of {n} elements on {parts.packed.device}; "
            f"got shape {tuple(out.shape)} on {out.device}. Allocate it with torch.empty(parts.shape)."
        )
    if out.dtype not in _OUT_FORMATS:
        raise ValueError(
            f"the Triton dequantize_nf4 writes bf16, fp16 or fp32; got {out.dtype}. Cast afterwards."
        )
    return out


def _check_power_of_two(block_size: int) -> None:
    if block_size < 2 or block_size & (block_size - 1):
        raise ValueError(
            f"the Triton NF4 kernels need a power-of-two block size (bitsandbytes uses 64..4096); got {block_size}"
        )
