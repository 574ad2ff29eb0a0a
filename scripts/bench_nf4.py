"""NF4 benchmark on the GPU machine: dequantize throughput vs the card's measured HBM bandwidth, and
NF4 linear forward+backward (to the input) at 4096 tokens vs a bf16 nn.Linear and torchao's NF4Tensor
(eager and torch.compile'd), for Llama-3.1-8B and 70B layer shapes.

    python scripts/bench_nf4.py --out /tmp/nf4_bench.json [--tokens 4096] [--models 8B,70B]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from torch import nn

from ftcore.kernels import nf4_triton
from ftcore.modules.nf4 import nf4_linear, to_nf4

# (out_features, in_features) per projection.
SHAPES = {
    "8B": {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)},
    "70B": {"q/o": (8192, 8192), "k/v": (1024, 8192), "gate/up": (28672, 8192), "down": (8192, 28672)},
}


def time_ms(fn, warmup: int = 5, iters: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def hbm_bandwidth_gbs() -> float:
    """Device-to-device copy of 2 GiB: bytes read + written per second."""
    src = torch.empty(2**30, dtype=torch.uint16, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def fwd_bwd(forward, x: torch.Tensor, grad: torch.Tensor):
    def step():
        x.grad = None
        forward(x).backward(grad)

    return step


def torchao_steps(w: torch.Tensor, x: torch.Tensor, grad: torch.Tensor) -> dict[str, float | str]:
    try:
        from torchao.dtypes.nf4tensor import linear_nf4
        from torchao.dtypes.nf4tensor import to_nf4 as ao_to_nf4
    except Exception as error:
        return {"torchao_eager_ms": repr(error), "torchao_compiled_ms": repr(error)}
    w_ao = ao_to_nf4(w)
    result: dict[str, float | str] = {
        "torchao_eager_ms": time_ms(fwd_bwd(lambda t: linear_nf4(t, w_ao), x, grad))
    }
    try:
        compiled = torch.compile(lambda t: linear_nf4(t, w_ao))
        result["torchao_compiled_ms"] = time_ms(fwd_bwd(compiled, x, grad), warmup=3)
    except Exception as error:
        result["torchao_compiled_ms"] = repr(error)
    return result


def bench_shape(model: str, name: str, shape: tuple[int, int], tokens: int, bandwidth: float) -> dict:
    out_dim, in_dim = shape
    w = (torch.randn(shape, device="cuda") * 0.02).bfloat16()
    parts = to_nf4(w)
    buffer = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    dequant_ms = time_ms(lambda: nf4_triton.dequantize_nf4(parts, out=buffer), iters=50)
    moved = sum(
        t.numel() * t.element_size() for t in (parts.packed, parts.absmax, parts.nested_absmax, buffer)
    )
    dequant_gbs = moved / dequant_ms / 1e6
    x = torch.randn(tokens, in_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, out_dim, device="cuda", dtype=torch.bfloat16)
    frozen = nn.Linear(in_dim, out_dim, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    trainable = nn.Linear(in_dim, out_dim, bias=False, device="cuda", dtype=torch.bfloat16)
    row = {
        "model": model, "layer": name, "shape": list(shape),
        "dequant_ms": dequant_ms, "dequant_GBps": dequant_gbs, "dequant_frac_hbm": dequant_gbs / bandwidth,
        "bf16_frozen_ms": time_ms(fwd_bwd(frozen, x, grad)),
        "bf16_trainable_ms": time_ms(fwd_bwd(trainable, x, grad)),
        "nf4_ms": time_ms(fwd_bwd(lambda t: nf4_linear(t, parts), x, grad)),
    }  # fmt: skip
    row.update(torchao_steps(w, x, grad))
    row["nf4_vs_bf16_frozen"] = row["nf4_ms"] / row["bf16_frozen_ms"]
    return row


def print_table(rows: list[dict], bandwidth: float) -> None:
    print(f"HBM bandwidth (D2D copy): {bandwidth:.0f} GB/s")
    cols = ["model", "layer", "dequant_GBps", "dequant_frac_hbm", "bf16_frozen_ms", "bf16_trainable_ms",
            "nf4_ms", "nf4_vs_bf16_frozen", "torchao_eager_ms", "torchao_compiled_ms"]  # fmt: skip
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c])[:40] for c in cols))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--models", default="8B,70B")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_nf4.py needs a CUDA GPU")
    torch.manual_seed(0)
    bandwidth = hbm_bandwidth_gbs()
    rows = []
    for model in args.models.split(","):
        for name, shape in SHAPES[model].items():
            rows.append(bench_shape(model, name, shape, args.tokens, bandwidth))
            torch.cuda.empty_cache()
    print_table(rows, bandwidth)
    with open(args.out, "w") as f:
        json.dump(
            {
                "device": torch.cuda.get_device_name(),
                "hbm_GBps": bandwidth,
                "tokens": args.tokens,
                "rows": rows,
            },
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
