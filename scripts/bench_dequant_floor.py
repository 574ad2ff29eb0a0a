"""What one kernel launch can reach at the NF4 dequantize's sizes, on the GPU machine.

bench_nf4.py reports the dequantize of the small Llama-3.1-8B weights (q/o, k/v) under 80% of the card's
copy bandwidth, and a device copy of the same bytes under it too. This script splits that gap: per shape,
the kernel time by CUPTI (torch.profiler, L2 flushed before each call, as bench_nf4 does) of

    copy          a device-to-device copy moving the dequantize's bytes (read + write)
    store_only    a Triton kernel writing the bf16 output alone (no reads), the dequantize's tiling
    expand        the same kernel reading the packed bytes and writing them widened, no decode
    dequant       ftcore's dequantize (default layout); `dequant_fp32_absmax` without double quant,
                  `dequant_ExW` at bench_nf4's (elements per program, warps) sweep
    words         the "words" layout (4-byte loads, 16-byte stores)

each as a fraction of the 2 GiB copy's bandwidth, plus a fixed-cost fit (time = bytes / B + t0) over the
shapes, and the dequantize of a (q;k;v;o) and a (q;k;v) stack: what one launch over a block's attention
weights would reach.

    python scripts/bench_dequant_floor.py --out /tmp/dequant_floor.json
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl
from bench_nf4 import SWEEP, copy_kernel_gbs, kernel_us  # scripts/ is on the path when run as a script

from ftcore.kernels import nf4_triton
from ftcore.modules.nf4 import random_nf4

SHAPES = {
    "8B k/v": (1024, 4096),
    "8B q/o": (4096, 4096),
    "8B q;k;v": (6144, 4096),
    "8B q;k;v;o": (10240, 4096),
    "8B gate/up": (14336, 4096),
    "70B q/o": (8192, 8192),
}


@triton.jit
def _store_kernel(packed_ptr, pairs_ptr, n_bytes, BYTES: tl.constexpr, READ: tl.constexpr):
    ids = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
    mask = ids < n_bytes
    if READ:
        word = tl.load(packed_ptr + ids, mask=mask, other=0).to(tl.int32) * 65537
    else:
        word = ids.to(tl.int32)
    tl.store(pairs_ptr + ids, word, mask=mask)


def shape_row(shape: tuple[int, int], bandwidth: float) -> dict:
    parts = random_nf4(*shape, std=0.02, device="cuda")
    out = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    moved = sum(t.numel() * t.element_size() for t in (parts.packed, parts.absmax, parts.nested_absmax, out))
    half = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
    half_dst = torch.empty_like(half)
    pairs = out.view(-1).view(torch.int32)
    n_bytes = parts.packed.numel()
    grid = (triton.cdiv(n_bytes, 4096),)
    plain = nf4_triton.ref.NF4Parts(parts.packed, parts.dequantize(torch.float32).view(-1, 64).abs().amax(1),
                                    None, None, parts.shape, parts.dtype, parts.block_size)  # fmt: skip
    store = lambda read: _store_kernel[grid](parts.packed, pairs, n_bytes, BYTES=4096, READ=read)  # noqa: E731
    timed = {
        "copy": lambda: half_dst.copy_(half),
        "store_only": lambda: store(False),
        "expand": lambda: store(True),
        "dequant": lambda: nf4_triton.dequantize_nf4(parts, out=out),
        "dequant_fp32_absmax": lambda: nf4_triton.dequantize_nf4(plain, out=out),
        "words": lambda: nf4_triton.dequantize_nf4(parts, out=out, variant="words", num_warps=8),
    }
    for e, w in SWEEP:
        timed[f"dequant_{e}x{w}"] = lambda e=e, w=w: nf4_triton.dequantize_nf4(
            parts, out=out, elements_per_program=e, num_warps=w
        )
    row: dict = {"shape": list(shape), "bytes": moved}
    for name, fn in timed.items():  # every kernel moves (or stands for) the dequantize's bytes
        us = kernel_us(fn)
        row[name] = {"us": us, "frac_copy_bw": moved / us / 1e3 / bandwidth}
    return row


def fixed_cost_fit(rows: dict, key: str) -> dict:
    """Least squares time = bytes / B + t0 over the shapes: B (GB/s) and t0 (us)."""
    xs = [r["bytes"] / 1e3 for r in rows.values()]  # KB -> us at GB/s
    ys = [r[key]["us"] for r in rows.values()]
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return {"GBps": 1 / slope, "t0_us": my - slope * mx, "n": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/dequant_floor.json")
    args = parser.parse_args()
    bandwidth = copy_kernel_gbs()
    print(f"{torch.cuda.get_device_name()}: 2 GiB copy {bandwidth:.0f} GB/s (CUPTI)", flush=True)
    rows = {}
    for name, shape in SHAPES.items():
        rows[name] = shape_row(shape, bandwidth)
        main_cells = {k: v for k, v in rows[name].items() if isinstance(v, dict) and not k[-1].isdigit()}
        cells = " | ".join(f"{k} {v['us']:.1f}us {v['frac_copy_bw']:.2f}" for k, v in main_cells.items())
        best = min((k for k in rows[name] if k[-1].isdigit()), key=lambda k: rows[name][k]["us"])
        print(
            f"{name} {shape}: {cells} | best swept {best} {rows[name][best]['frac_copy_bw']:.2f}", flush=True
        )
        torch.cuda.empty_cache()
    fits = {k: fixed_cost_fit(rows, k) for k in ("copy", "store_only", "expand", "dequant", "words")}
    for key, fit in fits.items():
        print(f"fit {key}: B {fit['GBps']:.0f} GB/s, t0 {fit['t0_us']:.2f} us", flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "copy_GBps": bandwidth, "rows": rows, "fits": fits}, f,
                  indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
