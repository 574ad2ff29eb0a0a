"""Triton kernels for NF4: quantize and dequantize (the NF4 linear builds on the latter).

Bit-identical to `nf4_reference` (same fp32 reciprocal-then-multiply, same midpoint compares, same
nibble order, mul then add with no fused multiply-add when undoing the double quantization). They
run on CUDA tensors, and on CPU tensors under `TRITON_INTERPRET=1` (how the tests check them).

The second level of double quantization (n / 64 absmax values, 1/64 of the data) reuses the
reference's vectorised torch code on the same device: the 8-bit binary search is tiny work and
sharing it keeps the two paths identical by construction.

The NF4 linear (`ftcore.kernels.nf4_linear`) dequantizes the weight into a bf16 buffer with
`dequantize_nf4` and lets cuBLAS do the matmul: at training shapes (thousands of tokens) the matmul
dominates and the dequantize costs one read of 0.53 bytes and one write of 2 bytes per weight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ftcore.kernels import nf4_reference as ref

_BLOCKS_PER_PROGRAM = 16  # 64-weight blocks handled by one quantize program
_BYTES_PER_PROGRAM = 1024  # packed bytes (2048 weights) handled by one dequantize program


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
def _to_bf16_round_nearest_even(x):
    # Round to nearest even on the bits: the GPU's cvt does this, the Triton interpreter's cast truncates,
    # so spelling it out keeps both bit-identical to torch's `.to(torch.bfloat16)`. Inputs are finite.
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _dequantize_nf4_kernel(
    packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, dynamic_ptr, out_ptr, n_bytes,
    BLOCK: tl.constexpr, NESTED_BLOCK: tl.constexpr, BYTES_PER_PROGRAM: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
):  # fmt: skip
    byte_ids = tl.program_id(0).to(tl.int64) * BYTES_PER_PROGRAM + tl.arange(0, BYTES_PER_PROGRAM)
    mask = byte_ids < n_bytes
    packed = tl.load(packed_ptr + byte_ids, mask=mask, other=0).to(tl.int32)
    block_ids = byte_ids // (BLOCK // 2)
    if DOUBLE_QUANT:
        q_absmax = tl.load(absmax_ptr + block_ids, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_ptr + block_ids // NESTED_BLOCK, mask=mask, other=0.0)
        # Launched with enable_fp_fusion=False: mul and add round separately, like the reference.
        absmax = tl.load(dynamic_ptr + q_absmax, mask=mask, other=0.0) * nested + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block_ids, mask=mask, other=0.0)
    first = tl.load(code_ptr + (packed >> 4), mask=mask, other=0.0) * absmax
    second = tl.load(code_ptr + (packed & 15), mask=mask, other=0.0) * absmax
    values = tl.join(first, second)  # (BYTES, 2): element order
    if out_ptr.dtype.element_ty == tl.bfloat16:
        values = _to_bf16_round_nearest_even(values)
    else:
        values = values.to(out_ptr.dtype.element_ty)
    out_ids = 2 * byte_ids[:, None] + tl.arange(0, 2)[None, :]
    tl.store(out_ptr + out_ids, values, mask=mask[:, None])


def quantize_nf4(
    w: torch.Tensor, block_size: int = ref.NF4_BLOCK_SIZE, double_quant: bool = True, bnb_approx: bool = False
) -> ref.NF4Parts:
    """Triton twin of `nf4_reference.quantize_nf4`. `bnb_approx` mimics bitsandbytes' fast-math reciprocal (CUDA only)."""
    ref.check_quantizable(w, block_size)
    flat = w.detach().contiguous().view(-1)
    n_blocks = flat.numel() // block_size
    packed = torch.empty(flat.numel() // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=w.device)
    grid = (triton.cdiv(n_blocks, _BLOCKS_PER_PROGRAM),)
    _quantize_nf4_kernel[grid](
        flat, packed, absmax, ref.nf4_thresholds(w.device), n_blocks,
        BLOCK=block_size, BLOCKS_PER_PROGRAM=_BLOCKS_PER_PROGRAM, BNB_APPROX=bnb_approx,
    )  # fmt: skip
    if not double_quant:
        return ref.NF4Parts(packed, absmax, None, None, w.shape, w.dtype, block_size)
    q_absmax, nested_absmax, offset = ref.double_quantize_absmax(absmax)
    return ref.NF4Parts(packed, q_absmax, nested_absmax, offset, w.shape, w.dtype, block_size)


def dequantize_nf4(
    parts: ref.NF4Parts, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Triton twin of `nf4_reference.dequantize_nf4` (optionally into a preallocated `out`)."""
    device = parts.packed.device
    if out is None:
        out = torch.empty(parts.shape, dtype=dtype or parts.dtype, device=device)
    n_bytes = parts.packed.numel()
    nested = parts.nested_absmax if parts.double_quant else parts.absmax  # unused without double quant
    offset = parts.offset if parts.double_quant else parts.absmax
    grid = (triton.cdiv(n_bytes, _BYTES_PER_PROGRAM),)
    _dequantize_nf4_kernel[grid](
        parts.packed, parts.absmax, nested, offset, ref.nf4_code(device), ref.dynamic_map(device), out, n_bytes,
        BLOCK=parts.block_size, NESTED_BLOCK=ref.NESTED_BLOCK_SIZE, BYTES_PER_PROGRAM=_BYTES_PER_PROGRAM,
        DOUBLE_QUANT=parts.double_quant, enable_fp_fusion=False,
    )  # fmt: skip
    return out
