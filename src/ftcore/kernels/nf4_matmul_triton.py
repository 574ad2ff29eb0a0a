"""Fused NF4 linear in Triton: the GEMM dequantizes W's tiles in registers, so W is read once as NF4.

    nf4_matmul(x, parts, bias)       x (M, K) @ W^T (+ bias) -> (M, N), W (N, K) stored as NF4
    nf4_matmul_grad_input(g, parts)  g (M, N) @ W           -> (M, K)

Dequantize + cuBLAS moves ~4.5 bytes per weight (0.53 NF4 in, 2 bf16 out, 2 back in); this kernel reads
0.53, so it was meant to win while reading W bounds the matmul (decode, small batches). Measured on an H200
it did not: 1.9-3.6x slower than dequantize + cuBLAS at one token, 15-18x at 4,096 (docs/nf4.md). So
`kernels.nf4_matmul_path` never picks it; decode uses `nf4_gemv_triton`, and this kernel runs only when forced.

Exactness: a W tile holds exactly the reference's dequantized values in the dot's dtype (x's dtype):
absmax = dynamic[q8] * nested + offset (double-quant decode, once per 64-block, no fused multiply-add:
launched with enable_fp_fusion=False), w = round(NF4_CODE[q4] * absmax). fp32 inputs use an IEEE fp32
dot (no TF32), so the result is `x @ dequantize(W).T` up to the fp32 accumulation order.

One kernel serves both products: the output's columns J and the reduction R are (N, K) for the forward
and (K, N) for grad-input; TRANS_W says which way the dequantized tile enters the dot. Tiles along W's K
axis span whole 64-blocks, so each tile row needs one absmax per block it covers.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ftcore.kernels import nf4_reference as ref
from ftcore.kernels.nf4_triton import (
    _INTERPRETED,
    _bf16_bits_round_nearest_even,
    _block_absmax,
    device_tables,
)

# torch dtype -> the kernels' dtype code (0: bf16 rounded on the bits, for the interpreter whose cast truncates).
_FORMATS = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}


class MatmulConfig(NamedTuple):
    """Tile sizes of one launch. block_r (forward) / block_j (grad-input) are whole NF4 blocks along K."""

    block_m: int
    block_j: int
    block_r: int
    split: int  # programs sharing one output tile's reduction (fp32 partials summed afterwards)
    num_warps: int
    num_stages: int


@triton.jit
def _to_format(x, FORMAT: tl.constexpr):
    # fp32 -> the dot / output dtype with one round-to-nearest-even.
    if FORMAT == 0:  # bf16 in the interpreter: round on the bits; the truncating cast is then exact
        return (_bf16_bits_round_nearest_even(x) << 16).to(tl.float32, bitcast=True).to(tl.bfloat16)
    elif FORMAT == 1:
        return x.to(tl.bfloat16)
    elif FORMAT == 2:
        return x.to(tl.float16)
    else:
        return x


@triton.jit
def _weight_tile(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, pairs_ptr, dynamic_ptr, rows, col0, N, K,
                 BLOCK_C: tl.constexpr, BS: tl.constexpr, NESTED_BLOCK: tl.constexpr,
                 DOUBLE_QUANT: tl.constexpr, FORMAT: tl.constexpr):  # fmt: skip
    # W[rows, col0 : col0 + BLOCK_C] as (R, BLOCK_C) in the dot dtype; zero outside W.
    NB: tl.constexpr = BLOCK_C // BS
    HALF: tl.constexpr = BS // 2
    blocks_per_row = K // BS
    kblocks = col0 // BS + tl.arange(0, NB)  # (NB,)
    block_ids = rows[:, None].to(tl.int64) * blocks_per_row + kblocks[None, :]  # (R, NB)
    mask = (rows < N)[:, None] & (kblocks < blocks_per_row)[None, :]
    absmax = _block_absmax(
        absmax_ptr, nested_ptr, offset_ptr, dynamic_ptr, block_ids, mask, NESTED_BLOCK, DOUBLE_QUANT
    )[:, :, None]  # (R, NB, 1)
    byte_ids = block_ids[:, :, None] * HALF + tl.arange(0, HALF)[None, None, :]  # (R, NB, HALF)
    packed = tl.load(packed_ptr + byte_ids, mask=mask[:, :, None], other=0).to(tl.int32)
    # One 8-byte lookup per byte: the fp32 codes of its high nibble (element 2i) and low nibble (2i + 1).
    pair = tl.load(pairs_ptr + packed)
    first = _to_format((pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True) * absmax, FORMAT)
    second = _to_format((pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True) * absmax, FORMAT)
    w = tl.reshape(tl.join(first, second), (rows.shape[0], BLOCK_C))  # (R, NB, HALF, 2) -> (R, BLOCK_C)
    cols = col0 + tl.arange(0, BLOCK_C)
    return tl.where((rows < N)[:, None] & (cols < K)[None, :], w, 0.0).to(first.dtype)


@triton.jit
def _nf4_matmul_kernel(
    a_ptr, packed_ptr, absmax_ptr, nested_ptr, offset_ptr, pairs_ptr, dynamic_ptr, bias_ptr, out_ptr,
    M, J, R, N, K, stride_am, stride_split,
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT: tl.constexpr, TRANS_W: tl.constexpr, HAS_BIAS: tl.constexpr, BS: tl.constexpr,
    NESTED_BLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, FORMAT: tl.constexpr, OUT_FORMAT: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    # out (M, J) [or fp32 partials (SPLIT, M, J)] = a (M, R) @ op(W); op(W) = W^T (N=J, K=R) or W (N=R, K=J).
    pid, split_id = tl.program_id(0), tl.program_id(1)
    tiles_m, tiles_j = tl.cdiv(M, BLOCK_M), tl.cdiv(J, BLOCK_J)
    # Grouped order: GROUP_M row-tiles walk the same W column-tiles while they are in L2.
    group = pid // (GROUP_M * tiles_j)
    first_m = group * GROUP_M
    group_m = min(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % (GROUP_M * tiles_j)) % group_m
    tile_j = (pid % (GROUP_M * tiles_j)) // group_m
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tile_j * BLOCK_J + tl.arange(0, BLOCK_J)
    r_tiles = tl.cdiv(R, BLOCK_R)
    per_split = tl.cdiv(r_tiles, SPLIT)
    acc = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
    for t in range(split_id * per_split, min((split_id + 1) * per_split, r_tiles)):
        offs_r = t * BLOCK_R + tl.arange(0, BLOCK_R)
        a_mask = (offs_m < M)[:, None] & (offs_r < R)[None, :]
        a = tl.load(
            a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_r[None, :], mask=a_mask, other=0.0
        )
        if TRANS_W:  # forward: tile W[j, r] (BLOCK_J, BLOCK_R), used transposed
            w = _weight_tile(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, pairs_ptr, dynamic_ptr, offs_j,
                             t * BLOCK_R, N, K, BLOCK_R, BS, NESTED_BLOCK, DOUBLE_QUANT, FORMAT)  # fmt: skip
            w = tl.trans(w)
        else:  # grad-input: tile W[r, j] (BLOCK_R, BLOCK_J)
            w = _weight_tile(packed_ptr, absmax_ptr, nested_ptr, offset_ptr, pairs_ptr, dynamic_ptr, offs_r,
                             tile_j * BLOCK_J, N, K, BLOCK_J, BS, NESTED_BLOCK, DOUBLE_QUANT, FORMAT)  # fmt: skip
        if IEEE:  # fp32 inputs (or, UPCAST, bf16 values held exactly in fp32)
            if UPCAST:
                a, w = a.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_j, mask=offs_j < J, other=0.0).to(tl.float32)[None, :]
    out_mask = (offs_m < M)[:, None] & (offs_j < J)[None, :]
    out_ptrs = (
        out_ptr + split_id.to(tl.int64) * stride_split + offs_m[:, None].to(tl.int64) * J + offs_j[None, :]
    )
    tl.store(out_ptrs, _to_format(acc, OUT_FORMAT), mask=out_mask)


@functools.lru_cache(maxsize=8)
def code_pairs(device: torch.device) -> torch.Tensor:
    """(256,) int64, built once per device: byte v -> fp32 bits of NF4_CODE[v >> 4] | NF4_CODE[v & 15] << 32."""
    bits = ref.nf4_code().view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # (16,)
    byte = torch.arange(256)
    return (bits[byte >> 4] | (bits[byte & 15] << 32)).to(device)


def pick_config(m: int, j: int, r: int, device: torch.device) -> MatmulConfig:
    """Tiles by token count M: small M is bound by reading W, so narrow M tiles and a split reduction keep
    every SM streaming W; large M uses the usual 128x128 Hopper GEMM tile. `scripts/bench_nf4.py` sweeps
    the alternatives (`fused_sweep`) on the GPU; retune these from it. Compiled for sm_90 (ptxas), these
    use 118-254 registers without spilling; 128-row tiles need 8 warps, 64x128x128 tiles spill."""
    if m <= 16:
        cfg = MatmulConfig(16, 64, 128, 1, 4, 4)
    elif m <= 64:
        cfg = MatmulConfig(64, 64, 64, 1, 4, 4)
    elif m <= 256:
        cfg = MatmulConfig(64, 128, 64, 1, 4, 4)
    else:
        return MatmulConfig(128, 128, 64, 1, 8, 3)
    return with_split(cfg, m, j, r, device)


def with_split(cfg: MatmulConfig, m: int, j: int, r: int, device: torch.device) -> MatmulConfig:
    """Too few output tiles to fill the card: split the reduction (2 programs per SM), each part >= 4 tiles."""
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(j, cfg.block_j)
    split = max(1, min(2 * _sm_count(device) // tiles, triton.cdiv(r, cfg.block_r) // 4))
    return cfg._replace(split=split)


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def nf4_matmul(
    x: torch.Tensor, parts: ref.NF4Parts, bias: torch.Tensor | None = None, config: MatmulConfig | None = None
) -> torch.Tensor:
    """x (M, K) @ dequantize(parts)^T (N, K) + bias -> (M, N) in x's dtype; one fused launch (+ a sum if split)."""
    n, k = parts.shape
    return _launch(x, parts, bias, trans_w=True, j=n, r=k, config=config)


def nf4_matmul_grad_input(
    g: torch.Tensor, parts: ref.NF4Parts, config: MatmulConfig | None = None
) -> torch.Tensor:
    """g (M, N) @ dequantize(parts) (N, K) -> (M, K) in g's dtype: the input gradient of `nf4_matmul`."""
    n, k = parts.shape
    return _launch(g, parts, None, trans_w=False, j=k, r=n, config=config)


def supports(parts: ref.NF4Parts, dtype: torch.dtype) -> bool:
    """Whether the fused kernel takes this weight: 2-D, rows of whole power-of-two blocks, a float dtype."""
    bs = parts.block_size
    shape_ok = len(parts.shape) == 2 and parts.shape[1] % bs == 0
    return shape_ok and dtype in _FORMATS and 32 <= bs <= 256 and bs & (bs - 1) == 0


def _launch(a, parts, bias, *, trans_w: bool, j: int, r: int, config: MatmulConfig | None) -> torch.Tensor:
    if a.dim() != 2 or a.shape[1] != r or not supports(parts, a.dtype):
        raise ValueError(
            f"nf4_matmul needs a 2-D input (M, {r}) in bf16/fp16/fp32 and a 2-D NF4 weight whose rows are whole "
            f"power-of-two blocks of 32..256; got input {tuple(a.shape)} {a.dtype}, weight {tuple(parts.shape)} "
            f"with block size {parts.block_size}. Use dequantize_nf4 + F.linear for other weights."
        )
    a = a if a.stride(1) == 1 else a.contiguous()
    m = a.shape[0]
    if m == 0:  # nothing to launch (a zero-size grid is an error)
        return a.new_zeros((0, j))
    cfg = config or pick_config(m, j, r, a.device)
    block_w = max(cfg.block_r if trans_w else cfg.block_j, parts.block_size)  # tile along K: whole blocks
    cfg = cfg._replace(**{"block_r" if trans_w else "block_j": block_w})
    # The interpreter both truncates fp32->bf16 casts and multiplies bf16 dot operands as raw uint16 bits:
    # there the tile is rounded on the bits (FORMAT 0) and the dot runs in fp32 on the exact bf16 values.
    fmt = 0 if a.dtype == torch.bfloat16 and _INTERPRETED else _FORMATS[a.dtype]
    if cfg.split > 1:  # fp32 partials, summed (deterministically) below
        out = torch.empty((cfg.split, m, j), dtype=torch.float32, device=a.device)
    else:
        out = torch.empty((m, j), dtype=a.dtype, device=a.device)
    code, dynamic = code_pairs(a.device), device_tables(a.device)[2]
    absmax = parts.absmax.reshape(-1)
    nested = parts.nested_absmax if parts.double_quant else absmax  # unused without double quant
    offset = parts.offset if parts.double_quant else absmax
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(j, cfg.block_j), cfg.split)
    _nf4_matmul_kernel[grid](
        a, parts.packed.reshape(-1), absmax, nested, offset, code, dynamic,
        bias if bias is not None and cfg.split == 1 else absmax, out,
        m, j, r, parts.shape[0], parts.shape[1], a.stride(0), m * j,
        BLOCK_M=cfg.block_m, BLOCK_J=cfg.block_j, BLOCK_R=cfg.block_r, GROUP_M=8, SPLIT=cfg.split,
        TRANS_W=trans_w, HAS_BIAS=bias is not None and cfg.split == 1, BS=parts.block_size,
        NESTED_BLOCK=ref.NESTED_BLOCK_SIZE, DOUBLE_QUANT=parts.double_quant, FORMAT=fmt,
        OUT_FORMAT=fmt if cfg.split == 1 else 3, IEEE=a.dtype == torch.float32 or fmt == 0, UPCAST=fmt == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
    )  # fmt: skip
    if cfg.split == 1:
        return out
    total = out.sum(0)  # (split, M, J) -> (M, J) fp32
    if bias is not None:
        total += bias.float()
    return total.to(a.dtype)
