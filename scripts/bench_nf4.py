"""NF4 benchmark on the GPU machine: dequantize throughput vs the card's measured HBM bandwidth, and
NF4 linear forward+backward (to the input) at 4096 tokens vs a bf16 nn.Linear and torchao's NF4Tensor
(eager and torch.compile'd), for Llama-3.1-8B and 70B layer shapes.

    python scripts/bench_nf4.py --out /tmp/nf4_bench.json [--tokens 4096] [--models 8B,70B] [--no-sweep]
        [--fused-tokens 1,16,64,256,4096] [--no-fused] [--quick] [--no-fused-sweep]
        [--gemv-tokens 1,2,4,8,16] [--gemv-sweep-tokens 1,8] [--no-gemv]

Also (JSON `fused_rows`, 8B shapes): the fused NF4 matmul (`nf4_matmul_triton`) against a bf16 F.linear and
against dequantize + cuBLAS per token count M, forward, and forward + grad-input at the largest M; the
`fused_vs_dequant` ratio per M is what `kernels.FUSED_NF4_MAX_TOKENS` is set from. JSON `gemv_rows` (8B
shapes): the NF4 GEMV (`nf4_gemv_triton`, decode) per M against the same two, with a sweep of its tilings
at `--gemv-sweep-tokens`; `kernels.NF4_GEMV_MAX_TOKENS` is the largest M whose `gemv_vs_dequant` (or, when
the sweep beat the default, `gemv_best_vs_dequant` after moving `pick_gemv_config` there) is < 1 on every
layer. `--quick` skips the tiled kernel's sweeps, its rows above 16 tokens and the torchao compile (the
dequantize rows and their sweeps still run). And per shape (JSON
`dequant_variants` in each row): the dequantize layout variants' GB/s as a fraction of the 2 GiB copy and
of a copy of the shape's own size. A short summary table is printed last.

Timing: CUDA events around each call, after an L2 flush and a GPU sleep that lets the host queue the call
before the GPU reaches it, so `*_ms` is device time (host launch overhead hidden, as in a training step
whose queue runs ahead); `*_loop_ms` is the mean of back-to-back calls, host overhead included;
`*_host_ms` is the host time to issue one call. The sleep is sized to twice the call's host time: a fixed
0.1 ms sleep hid the bf16 linear's launches but not the NF4 linear's (~0.8 ms on the H100 host), so
the first H100 table charged NF4 with host time (1.51x at 8B q/o, 3.48x at k/v; `*_loop_ms` 0.82 / 0.97).
`dequant_kernel_us` is the dequantize kernel's own duration (CUPTI, L2 flushed), and
`dequant_kernel_frac_copy` its bytes per second over the 2 GiB copy kernel's: an event pair around a
~15 us call adds ~3 us (8B q/o: 0.57 of the copy by events, 0.67-0.70 by kernel time on the H200).
`*_kernels` / `*_memcpy` / `*_syncs` come from torch.profiler for one call: kernels on the GPU, host<->device
copies, and host-blocking synchronizations (each one drains the GPU queue).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ftcore import kernels
from ftcore.kernels import nf4_gemv_triton, nf4_matmul_triton, nf4_triton
from ftcore.modules.nf4 import nf4_linear, to_nf4

# (out_features, in_features) per projection.
SHAPES = {
    "8B": {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)},
    "70B": {"q/o": (8192, 8192), "k/v": (1024, 8192), "gate/up": (28672, 8192), "down": (8192, 28672)},
}
SWEEP = [(e, w) for e in (2048, 4096, 8192, 16384) for w in (2, 4, 8)]  # (elements_per_program, num_warps)
# The other dequantize layouts: (elements_per_program, num_warps, programs_per_sm); "tile" is SWEEP above.
VARIANT_SWEEP = {
    "words": [(e, w, 4) for e in (2048, 4096, 8192, 16384) for w in (4, 8)],
    "persistent": [(e, w, p) for e in (1024, 2048, 4096) for w in (4, 8) for p in (2, 4, 8)],
}
MM = nf4_matmul_triton.MatmulConfig
# Fused-matmul tilings tried per token count (split picked as the kernel does), besides its own pick.
FUSED_SWEEP = {  # none spills registers on sm_90 (ptxas); 128x128x128 and 64x128x128 do
    16: [MM(16, 64, 64, 1, 4, 4), MM(16, 64, 128, 1, 4, 3), MM(16, 64, 256, 1, 4, 3), MM(16, 128, 128, 1, 4, 3),
         MM(16, 128, 64, 1, 4, 4), MM(16, 64, 128, 1, 8, 4)],
    64: [MM(32, 64, 64, 1, 4, 4), MM(32, 64, 128, 1, 4, 4), MM(32, 128, 64, 1, 4, 4), MM(64, 64, 64, 1, 4, 3),
         MM(64, 128, 64, 1, 4, 4)],
    256: [MM(64, 64, 64, 1, 4, 4), MM(64, 128, 64, 1, 4, 4), MM(128, 64, 64, 1, 8, 3), MM(128, 128, 64, 1, 8, 3)],
    2**31: [MM(128, 128, 64, 1, 8, 4), MM(128, 128, 64, 1, 8, 2), MM(128, 64, 64, 1, 8, 3), MM(64, 128, 64, 1, 4, 4)],
}  # fmt: skip
# GEMV tilings (block_n, block_k, num_warps), each at split 1, its auto split, half and twice that. Compiled
# for sm_90 (ptxas) none uses local memory up to M = 16 (8 x 256 x 2 warps keeps an 8-byte stack at 16);
# 16 x 1024 x 4 warps spills at M = 8, so wide K steps get 8 warps.
GEMV_SWEEP = [
    (16, 256, 4),
    (8, 256, 2),
    (32, 256, 8),
    (16, 512, 4),
    (64, 256, 8),
    (32, 512, 8),
    (16, 1024, 8),
]
_L2_FLUSH = None
_SLEEP_CYCLES_PER_MS = None


def l2_flush_buffer() -> torch.Tensor:
    """256 MiB that a call zeroes before each timed call, so no timed call finds its data in L2."""
    global _L2_FLUSH
    if _L2_FLUSH is None:
        _L2_FLUSH = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    return _L2_FLUSH


def sleep_cycles_per_ms() -> float:
    """GPU clock cycles of `torch.cuda._sleep` per millisecond, measured once."""
    global _SLEEP_CYCLES_PER_MS
    if _SLEEP_CYCLES_PER_MS is None:
        cycles = 20_000_000
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(cycles)  # warm
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        torch.cuda.synchronize()
        _SLEEP_CYCLES_PER_MS = cycles / start.elapsed_time(end)
    return _SLEEP_CYCLES_PER_MS


def host_ms(fn, iters: int = 20) -> float:
    """Median host time to issue one call (GPU idle before each): what a GPU sleep must cover."""
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e3


def device_ms(fn, warmup: int = 5, iters: int = 20) -> float:
    """Median device time of one call: L2 flushed, host ahead of the GPU (triton.testing.do_bench's method).

    The GPU sleeps for twice the call's host time (at least 0.1 ms) before the start event, so every launch
    of the call is queued before the GPU reaches it; a shorter sleep lets host time leak into the result."""
    flush = l2_flush_buffer()
    for _ in range(warmup):
        fn()
    sleep_cycles = int(max(0.1, 2 * host_ms(fn, iters=5) + 0.05) * sleep_cycles_per_ms())
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)
    ]
    for start, end in events:
        flush.zero_()
        torch.cuda._sleep(sleep_cycles)  # GPU time in which the host queues all of fn's launches
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def kernel_us(fn, calls: int = 30) -> float:
    """Median kernel duration (us, CUPTI via torch.profiler) of a one-kernel call, L2 flushed before each.

    An event pair around a call of ~10 us adds a few us of its own; the kernel's duration is what a
    fraction of the card's bandwidth is read off (nsys' and ncu's figure)."""
    flush = l2_flush_buffer()
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            flush.zero_()
            fn()
        torch.cuda.synchronize()
    gpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    durations = sorted(e.device_time for e in gpu if "fill" not in e.name.lower())  # the flush is a fill
    if len(durations) != calls:
        raise RuntimeError(
            f"kernel_us times one-kernel calls; got {len(durations)} kernels for {calls} calls"
        )
    return durations[calls // 2]


@functools.lru_cache(maxsize=1)
def copy_kernel_gbs() -> float:
    """The 2 GiB device copy's bandwidth by its kernel duration (bytes read + written)."""
    return _copy_2gib_gbs(lambda copy: kernel_us(copy, calls=5) / 1e3)


def loop_ms(fn, iters: int = 20) -> float:
    """Mean time of back-to-back calls: what a host-bound step sees (host overhead and syncs included)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def launch_counts(fn) -> dict[str, int]:
    """One call's GPU kernels and host<->device copies (torch.profiler) and host-blocking syncs (torch's
    sync debug mode warns on each synchronizing CUDA call)."""
    fn()  # warm: compilation stays outside the count
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
    gpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return {
        "kernels": sum(not e.name.startswith(("Memcpy", "Memset")) for e in gpu),
        "memcpy": sum(e.name.startswith("Memcpy") for e in gpu),
        "syncs": sum(_is_sync_warning(str(w.message)) for w in caught),
    }


def _is_sync_warning(message: str) -> bool:
    # The first set_sync_debug_mode call also warns that the mode is a prototype ("Synchronization debug
    # mode is a prototype feature"): that note is not a synchronization (it counted one in the first row).
    message = message.lower()
    return "synchroniz" in message and "prototype" not in message


def hbm_bandwidth_gbs() -> float:
    """Device-to-device copy of 2 GiB: bytes read + written per second (event-timed, as `device_ms`)."""
    return _copy_2gib_gbs(device_ms)


def _copy_2gib_gbs(time_ms) -> float:
    """GB/s of a 2 GiB device-to-device copy (bytes read + written) timed by `time_ms(fn) -> ms`."""
    src = torch.empty(2**30, dtype=torch.uint16, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / time_ms(lambda: dst.copy_(src)) / 1e6


def fwd_bwd(forward, x: torch.Tensor, grad: torch.Tensor):
    def step():
        x.grad = None
        forward(x).backward(grad)

    return step


def _import_torchao_nf4():
    try:  # torchao >= 0.1x moved NF4Tensor under quantization/
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
    except ImportError:
        from torchao.dtypes import nf4tensor as nf4_tensor
    return nf4_tensor.to_nf4, nf4_tensor.linear_nf4


def torchao_steps(w: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, compiled: bool) -> dict:
    try:
        ao_to_nf4, linear_nf4 = _import_torchao_nf4()
        w_ao = ao_to_nf4(w)
        result: dict = {"torchao_eager_ms": device_ms(fwd_bwd(lambda t: linear_nf4(t, w_ao), x, grad))}
    except Exception as error:  # report the reason in the table instead of losing the other columns
        return {"torchao_eager_ms": repr(error), "torchao_compiled_ms": repr(error)}
    if not compiled:
        return result
    try:
        step = fwd_bwd(torch.compile(lambda t: linear_nf4(t, w_ao)), x, grad)
        result["torchao_compiled_ms"] = device_ms(step, warmup=3)
    except Exception as error:
        result["torchao_compiled_ms"] = repr(error)
    return result


def dequant_row(parts, buffer: torch.Tensor, bandwidth: float, sweep: bool) -> dict:
    moved = sum(
        t.numel() * t.element_size() for t in (parts.packed, parts.absmax, parts.nested_absmax, buffer)
    )
    row = {"dequant_ms": device_ms(lambda: nf4_triton.dequantize_nf4(parts, out=buffer), iters=50)}
    row["dequant_GBps"] = moved / row["dequant_ms"] / 1e6
    row["dequant_frac_hbm"] = row["dequant_GBps"] / bandwidth
    row["dequant_kernel_us"] = kernel_us(lambda: nf4_triton.dequantize_nf4(parts, out=buffer))
    row["dequant_kernel_frac_copy"] = moved / row["dequant_kernel_us"] / 1e3 / copy_kernel_gbs()
    row.update(
        {"dequant_" + k: v for k, v in launch_counts(lambda: nf4_triton.dequantize_nf4(parts)).items()}
    )
    if sweep:
        timings = {
            f"{e}x{w}": device_ms(
                lambda e=e, w=w: nf4_triton.dequantize_nf4(
                    parts, out=buffer, elements_per_program=e, num_warps=w
                )
            )
            for e, w in SWEEP
        }
        best = min(timings, key=timings.get)
        row.update(
            dequant_sweep_ms=timings,
            dequant_best_cfg=best,
            dequant_best_frac_hbm=moved / timings[best] / 1e6 / bandwidth,
        )
    return row  # fmt: skip


def dequant_variant_row(parts, buffer: torch.Tensor, bandwidth: float) -> dict:
    """Each layout variant's best config: GB/s, fraction of the 2 GiB copy and of a same-size copy."""
    moved = sum(
        t.numel() * t.element_size() for t in (parts.packed, parts.absmax, parts.nested_absmax, buffer)
    )
    other = torch.empty_like(buffer)
    copy_gbps = (
        2 * buffer.numel() * buffer.element_size() / device_ms(lambda: other.copy_(buffer), iters=50) / 1e6
    )
    result: dict = {"copy_same_size_GBps": copy_gbps}
    for variant, configs in VARIANT_SWEEP.items():
        timings = {
            f"{e}x{w}x{p}": device_ms(
                lambda e=e, w=w, p=p, v=variant: nf4_triton.dequantize_nf4(
                    parts, out=buffer, elements_per_program=e, num_warps=w, variant=v, programs_per_sm=p
                ),
                iters=50,
            )
            for e, w, p in configs
        }
        best = min(timings, key=timings.get)
        gbps = moved / timings[best] / 1e6
        result[variant] = {"best_cfg": best, "ms": timings[best], "GBps": gbps, "frac_hbm": gbps / bandwidth,
                           "frac_same_size_copy": gbps / copy_gbps, "sweep_ms": timings}  # fmt: skip
    return result


def forced(path: str, fn):
    """fn run with the NF4 linear forced to one path ("gemv" / "fused" / "dequant"), backward included."""

    def call():
        previous, kernels.NF4_MATMUL_PATH = kernels.NF4_MATMUL_PATH, path
        try:
            return fn()
        finally:
            kernels.NF4_MATMUL_PATH = previous

    return call


def fused_sweep(parts, a: torch.Tensor, grad_input: bool) -> dict:
    m, r = a.shape
    j = parts.shape[1] if grad_input else parts.shape[0]
    configs = next(cs for limit, cs in sorted(FUSED_SWEEP.items()) if m <= limit)
    matmul = nf4_matmul_triton.nf4_matmul_grad_input if grad_input else nf4_matmul_triton.nf4_matmul
    timings = {}
    for cfg in configs:
        cfg = nf4_matmul_triton.with_split(cfg, m, j, r, a.device)
        timings[",".join(map(str, cfg))] = device_ms(lambda cfg=cfg: matmul(a, parts, config=cfg))
    best = min(timings, key=timings.get)
    return {"best_cfg": best, "best_ms": timings[best], "sweep_ms": timings}


def forward_row(shape: tuple[int, int], m: int, path: str, ms_key: str, pick_config) -> tuple:
    """One (out, in) bf16 weight in NF4 and m tokens, timed forward as bf16 `F.linear`, dequantize + cuBLAS
    and the forced `path`; returns (row, parts, x, the forced forward): the row's keys are the `path`-prefixed ones."""
    out_dim, in_dim = shape
    w = (torch.randn(shape, device="cuda") * 0.02).bfloat16()
    parts = to_nf4(w)
    x = torch.randn(m, in_dim, device="cuda", dtype=torch.bfloat16)
    kernel, dequant = (
        forced(path, lambda: nf4_linear(x, parts)),
        forced("dequant", lambda: nf4_linear(x, parts)),
    )
    row = {"tokens": m, f"{path}_cfg": ",".join(map(str, pick_config(m, out_dim, in_dim, x.device))),
           "bf16_fwd_ms": device_ms(lambda: F.linear(x, w)), "dequant_fwd_ms": device_ms(dequant),
           ms_key: device_ms(kernel), f"{path}_max_abs_diff": (kernel() - dequant()).abs().max().item()}  # fmt: skip
    row[f"{path}_vs_bf16"] = row[ms_key] / row["bf16_fwd_ms"]
    row[f"{path}_vs_dequant"] = row[ms_key] / row["dequant_fwd_ms"]
    return row, parts, x, kernel


def fused_row(shape: tuple[int, int], m: int, train: bool, sweep: bool) -> dict:
    """Forward (and with `train` forward + grad-input) at m tokens: bf16, dequantize + cuBLAS, fused."""
    out_dim, in_dim = shape
    row, parts, x, _ = forward_row(shape, m, "fused", "fused_fwd_ms", nf4_matmul_triton.pick_config)
    if sweep:
        row["fused_sweep"] = fused_sweep(parts, x, grad_input=False)
    if train:
        leaf = x.clone().requires_grad_(True)
        grad = torch.randn(m, out_dim, device="cuda", dtype=torch.bfloat16)
        frozen = nn.Linear(in_dim, out_dim, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(
            False
        )
        step = fwd_bwd(lambda t: nf4_linear(t, parts), leaf, grad)
        row.update(bf16_fwd_bwd_ms=device_ms(fwd_bwd(frozen, leaf, grad)), dequant_fwd_bwd_ms=device_ms(forced("dequant", step)),
                   fused_fwd_bwd_ms=device_ms(forced("fused", step)))  # fmt: skip
        row["fused_fwd_bwd_vs_dequant"] = row["fused_fwd_bwd_ms"] / row["dequant_fwd_bwd_ms"]
        if sweep:
            row["fused_grad_input_sweep"] = fused_sweep(parts, grad, grad_input=True)
    return row


def fused_rows(tokens: list[int], sweep: bool, result: dict, out_path: str) -> None:
    print("model | layer | tokens | bf16_fwd_ms | dequant_fwd_ms | fused_fwd_ms | fused_vs_bf16 | fused_vs_dequant | "
          "fused_best_ms | fused_fwd_bwd_vs_dequant", flush=True)  # fmt: skip
    for name, shape in SHAPES["8B"].items():
        for m in tokens:
            row = {"model": "8B", "layer": name, "shape": list(shape), "tokens": m}
            try:
                row.update(fused_row(shape, m, train=m == max(tokens), sweep=sweep))
            except Exception as error:  # recorded in the JSON; the other token counts still run
                print(f"8B {name} tokens={m}: fused row failed: {error!r}", flush=True)
                result["fused_rows"].append({**row, "error": repr(error)})
                continue
            best = row.get("fused_sweep", {}).get("best_ms", "-")
            cells = [row["model"], name, m] + [row[k] for k in ("bf16_fwd_ms", "dequant_fwd_ms", "fused_fwd_ms",
                     "fused_vs_bf16", "fused_vs_dequant")] + [best, row.get("fused_fwd_bwd_vs_dequant", "-")]  # fmt: skip
            print(" | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in cells), flush=True)
            result["fused_rows"].append(row)
            with open(out_path, "w") as f:
                json.dump(result, f, indent=1)
            torch.cuda.empty_cache()


def gemv_sweep(parts, x: torch.Tensor) -> dict:
    """Each GEMV_SWEEP tiling at split 1, half its auto split, the auto split and twice it."""
    n, k = parts.shape
    timings = {}
    for block_n, block_k, warps in GEMV_SWEEP:
        auto = nf4_gemv_triton.auto_split(n, k, block_n, block_k, x.device)
        for split in sorted({1, max(1, auto // 2), auto, min(2 * auto, max(1, k // block_k // 2))}):
            cfg = nf4_gemv_triton.GemvConfig(block_n, block_k, split, warps)
            timings[",".join(map(str, cfg))] = device_ms(
                lambda cfg=cfg: nf4_gemv_triton.nf4_gemv(x, parts, config=cfg)
            )
    best = min(timings, key=timings.get)
    return {"best_cfg": best, "best_ms": timings[best], "sweep_ms": timings}


def gemv_row(shape: tuple[int, int], m: int, sweep: bool) -> dict:
    """Forward at m tokens: bf16 F.linear, dequantize + cuBLAS, the NF4 GEMV (default config, then swept)."""
    row, parts, x, gemv = forward_row(shape, m, "gemv", "gemv_ms", nf4_gemv_triton.pick_gemv_config)
    row["gemv_GBps"] = (
        sum(t.numel() * t.element_size() for t in (parts.packed, parts.absmax)) / row["gemv_ms"] / 1e6
    )
    row.update({"gemv_" + k: v for k, v in launch_counts(gemv).items()})
    if sweep:
        row["gemv_sweep"] = gemv_sweep(parts, x)
        row["gemv_best_vs_dequant"] = row["gemv_sweep"]["best_ms"] / row["dequant_fwd_ms"]
    return row


def gemv_rows(tokens: list[int], sweep_tokens: set[int], result: dict, out_path: str) -> None:
    print("model | layer | tokens | bf16_fwd_ms | dequant_fwd_ms | gemv_ms | gemv_vs_bf16 | gemv_vs_dequant | "
          "gemv_GBps | gemv_kernels | gemv_best_ms | gemv_best_vs_dequant | gemv_best_cfg", flush=True)  # fmt: skip
    for name, shape in SHAPES["8B"].items():
        for m in tokens:
            row = {"model": "8B", "layer": name, "shape": list(shape), "tokens": m}
            try:
                row.update(gemv_row(shape, m, sweep=m in sweep_tokens))
            except Exception as error:  # recorded in the JSON; the other token counts still run
                print(f"8B {name} tokens={m}: gemv row failed: {error!r}", flush=True)
                result["gemv_rows"].append({**row, "error": repr(error)})
                continue
            best = row.get("gemv_sweep", {})
            cells = [row["model"], name, m] + [row[k] for k in ("bf16_fwd_ms", "dequant_fwd_ms", "gemv_ms",
                     "gemv_vs_bf16", "gemv_vs_dequant", "gemv_GBps", "gemv_kernels")] + [
                     best.get("best_ms", "-"), row.get("gemv_best_vs_dequant", "-"), best.get("best_cfg", "-")]  # fmt: skip
            print(" | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in cells), flush=True)
            result["gemv_rows"].append(row)
            with open(out_path, "w") as f:
                json.dump(result, f, indent=1)
            torch.cuda.empty_cache()


def print_summary(result: dict) -> None:
    """The short tables: GEMV and fused vs the alternatives per M, then the best dequantize layout per shape."""
    print("\nSUMMARY NF4 GEMV (8B, bf16, device ms): layer | M | bf16 | dequant+cuBLAS | gemv | gemv/bf16 | "
          "gemv/dequant | swept best gemv/dequant at cfg", flush=True)  # fmt: skip
    for row in result.get("gemv_rows", []):
        keys = (
            "bf16_fwd_ms",
            "dequant_fwd_ms",
            "gemv_ms",
            "gemv_vs_bf16",
            "gemv_vs_dequant",
            "gemv_best_vs_dequant",
        )
        cells = [row["layer"], row["tokens"], *(row.get(k, "-") for k in keys),
                 row.get("gemv_sweep", {}).get("best_cfg", "-"), row.get("error", "")]  # fmt: skip
        print(" | ".join(f"{c:.4f}" if isinstance(c, float) else str(c) for c in cells))
    print("\nSUMMARY fused NF4 matmul (8B, bf16, device ms): layer | M | bf16 | dequant+cuBLAS | fused | "
          "fused/dequant | fused fwd+grad_in / dequant | fused sweep", flush=True)  # fmt: skip
    for row in result["fused_rows"]:
        keys = (
            "bf16_fwd_ms",
            "dequant_fwd_ms",
            "fused_fwd_ms",
            "fused_vs_dequant",
            "fused_fwd_bwd_vs_dequant",
        )
        best = row.get("fused_sweep", {})
        cells = [row["layer"], row["tokens"], *(row.get(k, "-") for k in keys),
                 f"sweep best {best.get('best_ms', '-')} ms at {best.get('best_cfg', '-')}", row.get("error", "")]  # fmt: skip
        print(" | ".join(f"{c:.4f}" if isinstance(c, float) else str(c) for c in cells))
    print(
        "SUMMARY dequantize, fraction of 2 GiB copy (of same-size copy): model | layer | tile | words | persistent"
    )
    for row in result["rows"]:
        variants = row.get("dequant_variants", {})
        if "error" in variants:
            print(row["model"], row["layer"], "variants failed:", variants["error"][:200])
            continue
        cells = [
            row["model"],
            row["layer"],
            f"{row.get('dequant_best_frac_hbm', row['dequant_frac_hbm']):.2f}",
        ]
        for v in ("words", "persistent"):
            d = variants.get(v)
            cells.append(
                f"{d['frac_hbm']:.2f} ({d['frac_same_size_copy']:.2f}) {d['best_cfg']}" if d else "-"
            )
        print(" | ".join(cells), flush=True)


def bench_shape(shape: tuple[int, int], tokens: int, bandwidth: float, args) -> dict:
    out_dim, in_dim = shape
    w = (torch.randn(shape, device="cuda") * 0.02).bfloat16()
    parts = to_nf4(w)
    buffer = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    row = dequant_row(parts, buffer, bandwidth, args.sweep)
    if args.sweep:
        try:  # a failing variant must not cost the established columns of this row
            row["dequant_variants"] = dequant_variant_row(parts, buffer, bandwidth)
        except Exception as error:
            row["dequant_variants"] = {"error": repr(error)}
    x = torch.randn(tokens, in_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, out_dim, device="cuda", dtype=torch.bfloat16)
    frozen = nn.Linear(in_dim, out_dim, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    trainable = nn.Linear(in_dim, out_dim, bias=False, device="cuda", dtype=torch.bfloat16)
    nf4_step, frozen_step = fwd_bwd(lambda t: nf4_linear(t, parts), x, grad), fwd_bwd(frozen, x, grad)
    row.update(
        bf16_frozen_ms=device_ms(frozen_step), bf16_trainable_ms=device_ms(fwd_bwd(trainable, x, grad)),
        nf4_ms=device_ms(nf4_step), bf16_frozen_loop_ms=loop_ms(frozen_step), nf4_loop_ms=loop_ms(nf4_step),
        bf16_frozen_host_ms=host_ms(frozen_step), nf4_host_ms=host_ms(nf4_step),
    )  # fmt: skip
    row.update({"nf4_step_" + k: v for k, v in launch_counts(nf4_step).items()})
    row.update(torchao_steps(w, x, grad, args.torchao_compile))
    row["nf4_vs_bf16_frozen"] = row["nf4_ms"] / row["bf16_frozen_ms"]
    return row


COLUMNS = ["model", "layer", "dequant_ms", "dequant_GBps", "dequant_frac_hbm", "dequant_kernel_us",
           "dequant_kernel_frac_copy", "dequant_kernels", "dequant_syncs",
           "dequant_best_cfg", "dequant_best_frac_hbm", "bf16_frozen_ms", "nf4_ms", "nf4_vs_bf16_frozen",
           "bf16_frozen_loop_ms", "nf4_loop_ms", "bf16_frozen_host_ms", "nf4_host_ms", "nf4_step_kernels", "nf4_step_syncs", "torchao_eager_ms",
           "torchao_compiled_ms"]  # fmt: skip


def print_row(row: dict) -> None:
    cells = [f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c, "-"))[:40] for c in COLUMNS]
    print(" | ".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--models", default="8B,70B")
    parser.add_argument(
        "--no-sweep", dest="sweep", action="store_false", help="skip the dequant config sweep"
    )
    parser.add_argument("--no-torchao-compile", dest="torchao_compile", action="store_false")
    parser.add_argument(
        "--fused-tokens", default="1,16,64,256,4096", help="token counts for the fused matmul"
    )
    parser.add_argument("--no-fused", dest="fused", action="store_false", help="skip the fused-matmul rows")
    parser.add_argument(
        "--no-fused-sweep",
        dest="fused_sweep",
        action="store_false",
        help="skip the tiled fused kernel's sweeps",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="no tiled fused sweeps, tiled rows only up to 16 tokens, no torchao compile (~80 s run)",
    )
    parser.add_argument("--gemv-tokens", default="1,2,4,8,16", help="token counts for the NF4 GEMV rows")
    parser.add_argument(
        "--gemv-sweep-tokens", default="1,8", help="token counts at which the GEMV tilings are swept"
    )
    parser.add_argument("--no-gemv", dest="gemv", action="store_false", help="skip the NF4 GEMV rows")
    args = parser.parse_args()
    if args.quick:  # torch.compile of torchao's NF4 per shape is the slowest part after the tiled sweeps
        args.torchao_compile = False
    if not torch.cuda.is_available():
        raise SystemExit("bench_nf4.py needs a CUDA GPU")
    torch.manual_seed(0)
    bandwidth = hbm_bandwidth_gbs()
    print(
        f"{torch.cuda.get_device_name()}: HBM bandwidth (D2D copy) {bandwidth:.0f} GB/s, tokens={args.tokens}"
    )
    print(" | ".join(COLUMNS), flush=True)
    result = {
        "device": torch.cuda.get_device_name(),
        "hbm_GBps": bandwidth,
        "tokens": args.tokens,
        "rows": [],
        "fused_rows": [],
        "gemv_rows": [],
    }
    for model in args.models.split(","):
        for name, shape in SHAPES[model].items():
            row = {"model": model, "layer": name, "shape": list(shape)}
            row.update(bench_shape(shape, args.tokens, bandwidth, args))
            print_row(row)
            result["rows"].append(row)
            with open(args.out, "w") as f:  # rewritten per row: a timeout still leaves the rows so far
                json.dump(result, f, indent=1)
            torch.cuda.empty_cache()
    if args.gemv:
        sweep_tokens = {int(t) for t in args.gemv_sweep_tokens.split(",") if t} if args.sweep else set()
        gemv_rows([int(t) for t in args.gemv_tokens.split(",")], sweep_tokens, result, args.out)
    if args.fused:
        tokens = [int(t) for t in args.fused_tokens.split(",") if not args.quick or int(t) <= 16]
        fused_rows(tokens, args.sweep and args.fused_sweep and not args.quick, result, args.out)
    print_summary(result)


if __name__ == "__main__":
    main()
