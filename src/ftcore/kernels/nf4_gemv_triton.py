"""NF4 GEMV in Triton for decode (a few tokens): y = x (M, K) @ W^T (N, K) + bias, W read once as NF4 bytes.

At M = 1..~8 the product is bound by reading W (0.53 bytes per weight), not by arithmetic, so there is no
tl.dot: each program owns BLOCK_N rows of W and walks K in chunks of BLOCK_K, loading its rows' bytes as a
(BLOCK_N, BLOCK_K / 64, 32) tile (contiguous along K: wide, coalesced loads), decoding both nibbles through
the 16-entry code table (one 64-byte line, L1-resident), scaling by each 64-block's absmax (double quant
decoded once per block) and multiplying by the x chunk of every token, accumulated in fp32 registers.
With few rows (k/v: N = 1024) SPLIT programs share a row block's K range; their fp32 partials are summed in
a fixed order by a second small kernel (deterministic; no atomics), which also adds the bias and casts.

Exactness: every product uses exactly the reference's dequantized weight rounded to x's dtype (launched
with enable_fp_fusion=False, so the absmax decode's mul and add round separately). A bf16/fp16 value times
a bf16/fp16 value is exact in fp32, so the result is `x @ dequantize(W).T` up to the fp32 summation order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ftcore.kernels import nf4_reference as ref
from ftcore.kernels.nf4_matmul_triton import _FORMATS, _sm_count, _to_format
from ftcore.kernels.nf4_triton import _INTERPRETED, _block_absmax, device_tables

MAX_TOKENS = 16  # M is a compile-time constant (the token loop is unrolled): one compile per M up to here


class GemvConfig(NamedTuple):
    block_n: int  # rows of W per program
    block_k: int  # K per loop step: whole NF4 blocks, a power of two
    split: int  # programs sharing one row block's K range (fp32 partials summed afterwards)
    num_warps: int


@triton.jit
def _nf4_gemv_kernel(
    x_ptr, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, code_ptr, dynamic_ptr, bias_ptr, out_ptr,
    N, K, stride_xm, stride_split, chunks_per_split,
    M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, BS: tl.constexpr, NESTED_BLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    FORMAT: tl.constexpr, OUT_FORMAT: tl.constexpr,
):  # fmt: skip
    # out (M, N) [or fp32 partials (SPLIT, M, N)] = x (M, K) @ W[rows]^T over this program's K chunks.
    NB: tl.constexpr = BLOCK_K // BS  # NF4 blocks per row per chunk
    HALF: tl.constexpr = BS // 2  # bytes per NF4 block
    pid_n, split_id = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_ok = rows < N
    blocks_per_row = K // BS
    nb = tl.arange(0, NB)  # (NB,)
    pair = tl.arange(0, HALF)  # (HALF,)
    row_blocks = rows[:, None].to(tl.int64) * blocks_per_row  # (BLOCK_N, 1)
    tokens = tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_1 = tl.zeros((BLOCK_N, NB, HALF), dtype=tl.float32)  # M == 1: products summed once, after the loop
    first_chunk = split_id * chunks_per_split
    last_chunk = tl.minimum(first_chunk + chunks_per_split, tl.cdiv(K, BLOCK_K))
    for c in range(first_chunk, last_chunk):
        kblocks = c * NB + nb  # (NB,) block index along the row
        block_mask = row_ok[:, None] & (kblocks < blocks_per_row)[None, :]  # (BLOCK_N, NB)
        block_ids = row_blocks + kblocks[None, :]  # (BLOCK_N, NB)
        absmax = _block_absmax(
            absmax_ptr, nested_ptr, offset_ptr, dynamic_ptr, block_ids, block_mask, NESTED_BLOCK, DOUBLE_QUANT
        )[:, :, None]  # (BLOCK_N, NB, 1)
        byte_ids = block_ids[:, :, None] * HALF + pair[None, None, :]  # (BLOCK_N, NB, HALF)
        packed = tl.load(packed_ptr + byte_ids, mask=block_mask[:, :, None], other=0).to(tl.int32)
        # Element 2i is the high nibble, 2i + 1 the low one; rounded once to x's dtype, then exact in fp32.
        w_even = _to_format(tl.load(code_ptr + (packed >> 4)) * absmax, FORMAT).to(tl.float32)
        w_odd = _to_format(tl.load(code_ptr + (packed & 15)) * absmax, FORMAT).to(tl.float32)
        cols = kblocks[:, None] * BS + 2 * pair[None, :]  # (NB, HALF): columns of the even elements
        col_ok = (kblocks < blocks_per_row)[:, None]
        for m in tl.static_range(M):  # tokens unrolled: x rows are a few KB, L1/L2-resident
            x_row = x_ptr + m * stride_xm + cols
            x_even = tl.load(x_row, mask=col_ok, other=0.0).to(tl.float32)[None, :, :]  # (1, NB, HALF)
            x_odd = tl.load(x_row + 1, mask=col_ok, other=0.0).to(tl.float32)[None, :, :]
            if M == 1:  # no cross-thread reduction (shuffles, a layout change) inside the loop
                # Explicit FMAs (the launch disables fusion): exact bf16/fp16 products round as in mul + add.
                acc_1 = tl.fma(w_odd, x_odd, tl.fma(w_even, x_even, acc_1))
            else:
                part = tl.sum(tl.sum(w_even * x_even + w_odd * x_odd, axis=2), axis=1)  # (BLOCK_N,)
                acc += tl.where(tokens[:, None] == m, part[None, :], 0.0)
    if M == 1:
        acc += tl.sum(tl.sum(acc_1, axis=2), axis=1)[None, :]  # (1, BLOCK_N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + split_id.to(tl.int64) * stride_split + tokens[:, None] * N + rows[None, :]
    tl.store(out_ptrs, _to_format(acc, OUT_FORMAT), mask=(tokens < M)[:, None] & row_ok[None, :])


@triton.jit
def _sum_splits_kernel(partials_ptr, bias_ptr, out_ptr, N, total, split,
                       BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_FORMAT: tl.constexpr):  # fmt: skip
    # out (M, N) = sum over s = 0..split-1, in that order, of partials[s] (+ bias): one launch, deterministic.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(split):  # a runtime bound: one compile for every split
        acc += tl.load(partials_ptr + s * total + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, _to_format(acc, OUT_FORMAT), mask=mask)


def pick_gemv_config(m: int, n: int, k: int, device: torch.device) -> GemvConfig:
    """16 rows x 256 columns per step (2 KiB of NF4 bytes, 32 weights per thread), 4 warps, `auto_split`.
    PROVISIONAL: `scripts/bench_nf4.py` sweeps the alternatives (`gemv_sweep`) on the GPU; retune from it."""
    return GemvConfig(16, 256, auto_split(n, k, 16, 256, device), 4)


def auto_split(n: int, k: int, block_n: int, block_k: int, device: torch.device) -> int:
    """K split until ~4 programs per SM stream W (k/v, N = 1024: 64 row blocks), each part >= 4 K steps."""
    programs, chunks = triton.cdiv(n, block_n), triton.cdiv(k, block_k)
    return max(1, min(triton.cdiv(4 * _sm_count(device), programs), chunks // 4, 16))


def supports(parts: ref.NF4Parts, dtype: torch.dtype, tokens: int) -> bool:
    """Whether the GEMV takes this call: 2-D weight of whole power-of-two blocks (32..256), a float dtype,
    1..MAX_TOKENS tokens."""
    bs = parts.block_size
    shape_ok = len(parts.shape) == 2 and parts.shape[1] % bs == 0
    block_ok = 32 <= bs <= 256 and bs & (bs - 1) == 0
    return shape_ok and block_ok and dtype in _FORMATS and 1 <= tokens <= MAX_TOKENS


def nf4_gemv(
    x: torch.Tensor, parts: ref.NF4Parts, bias: torch.Tensor | None = None, config: GemvConfig | None = None
) -> torch.Tensor:
    """x (M, K) @ dequantize(parts)^T (N, K) + bias -> (M, N) in x's dtype, M in 1..MAX_TOKENS."""
    n, k = parts.shape[0], parts.shape[-1]
    if x.dim() != 2 or x.shape[1] != k or not supports(parts, x.dtype, x.shape[0]):
        raise ValueError(
            f"nf4_gemv needs a 2-D input (M, {k}) with 1 <= M <= {MAX_TOKENS} in bf16/fp16/fp32 and a 2-D NF4 "
            f"weight whose rows are whole power-of-two blocks of 32..256; got input {tuple(x.shape)} {x.dtype}, "
            f"weight {tuple(parts.shape)} with block size {parts.block_size}. Use nf4_matmul or dequantize + "
            "F.linear for more tokens or other weights."
        )
    x = x if x.stride(1) == 1 else x.contiguous()
    bias = bias.contiguous() if bias is not None else None
    m = x.shape[0]
    cfg = config or pick_gemv_config(m, n, k, x.device)
    block_k = max(cfg.block_k, parts.block_size)  # whole NF4 blocks per step
    chunks = triton.cdiv(k, block_k)
    per_split = triton.cdiv(chunks, cfg.split)
    split = triton.cdiv(chunks, per_split)  # no empty parts
    fmt = 0 if x.dtype == torch.bfloat16 and _INTERPRETED else _FORMATS[x.dtype]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    partials = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    code, _, dynamic = device_tables(x.device)
    absmax = parts.absmax.reshape(-1)
    nested = parts.nested_absmax if parts.double_quant else absmax  # unused without double quant
    offset = parts.offset if parts.double_quant else absmax
    bias_in_gemv = bias is not None and split == 1
    _nf4_gemv_kernel[(triton.cdiv(n, cfg.block_n), split)](
        x, parts.packed.reshape(-1), absmax, nested, offset, code, dynamic,
        bias if bias_in_gemv else absmax, partials, n, k, x.stride(0), m * n, per_split,
        M=m, BLOCK_M=triton.next_power_of_2(m), BLOCK_N=cfg.block_n, BLOCK_K=block_k, HAS_BIAS=bias_in_gemv,
        BS=parts.block_size, NESTED_BLOCK=ref.NESTED_BLOCK_SIZE, DOUBLE_QUANT=parts.double_quant,
        FORMAT=fmt, OUT_FORMAT=fmt if split == 1 else 3, num_warps=cfg.num_warps, enable_fp_fusion=False,
    )  # fmt: skip
    if split > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](
            partials, bias if bias is not None else partials, out, n, m * n, split,
            BLOCK=block, HAS_BIAS=bias is not None, OUT_FORMAT=fmt, num_warps=4,
        )  # fmt: skip
    return out
