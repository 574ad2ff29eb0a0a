"""NF4 benchmark on the GPU machine: dequantize throughput vs the card's measured HBM bandwidth, and
NF4 linear forward+backward (to the input) at 4096 tokens vs a bf16 nn.Linear and torchao's NF4Tensor
(eager and torch.compile'd), for Llama-3.1-8B and 70B layer shapes.

    python scripts/bench_nf4.py --out /tmp/nf4_bench.json [--tokens 4096] [--models 8B,70B] [--no-sweep]

Timing: CUDA events around each call, after an L2 flush and a GPU sleep that lets the host queue the call
before the GPU reaches it, so `*_ms` is device time (host launch overhead hidden, as in a training step
whose queue runs ahead); `*_loop_ms` is the mean of back-to-back calls, host overhead included;
`*_host_ms` is the host time to issue one call. The sleep is sized to twice the call's host time: a fixed
0.1 ms sleep hid the bf16 linear's launches but not the NF4 linear's (~0.8 ms on the H100 host), so
the first H100 table charged NF4 with host time (1.51x at 8B q/o, 3.48x at k/v; `*_loop_ms` 0.82 / 0.97).
`*_kernels` / `*_memcpy` / `*_syncs` come from torch.profiler for one call: kernels on the GPU, host<->device
copies, and host-blocking synchronizations (each one drains the GPU queue).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ftcore.kernels import nf4_triton
from ftcore.modules.nf4 import nf4_linear, to_nf4

# (out_features, in_features) per projection.
SHAPES = {
    "8B": {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)},
    "70B": {"q/o": (8192, 8192), "k/v": (1024, 8192), "gate/up": (28672, 8192), "down": (8192, 28672)},
}
SWEEP = [(e, w) for e in (2048, 4096, 8192, 16384) for w in (2, 4, 8)]  # (elements_per_program, num_warps)
_L2_FLUSH = None
_SLEEP_CYCLES_PER_MS = None


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
    global _L2_FLUSH
    if _L2_FLUSH is None:
        _L2_FLUSH = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    sleep_cycles = int(max(0.1, 2 * host_ms(fn, iters=5) + 0.05) * sleep_cycles_per_ms())
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)
    ]
    for start, end in events:
        _L2_FLUSH.zero_()
        torch.cuda._sleep(sleep_cycles)  # GPU time in which the host queues all of fn's launches
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


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
        "syncs": sum("synchroniz" in str(w.message).lower() for w in caught),
    }


def hbm_bandwidth_gbs() -> float:
    """Device-to-device copy of 2 GiB: bytes read + written per second."""
    src = torch.empty(2**30, dtype=torch.uint16, device="cuda")
    dst = torch.empty_like(src)
    ms = device_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


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


def bench_shape(shape: tuple[int, int], tokens: int, bandwidth: float, args) -> dict:
    out_dim, in_dim = shape
    w = (torch.randn(shape, device="cuda") * 0.02).bfloat16()
    parts = to_nf4(w)
    row = dequant_row(parts, torch.empty(shape, dtype=torch.bfloat16, device="cuda"), bandwidth, args.sweep)
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


COLUMNS = ["model", "layer", "dequant_ms", "dequant_GBps", "dequant_frac_hbm", "dequant_kernels", "dequant_syncs",
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
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
