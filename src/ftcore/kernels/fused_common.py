"""What the fused elementwise kernels (fused_norm, fused_swiglu, fused_rope) share: an optional Triton.

Triton is optional on CPU-only installs: without it `jit` leaves the kernel a plain (never called)
function and every op runs its PyTorch reference. The kernels' `tl.constexpr` annotations are strings
(`from __future__ import annotations` in each kernel file), so they need no Triton to be defined.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = tl = None

# Under the interpreter the kernels run on CPU tensors too: how the tests check them without a GPU.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def jit(fn):
    return fn if triton is None else triton.jit(fn)


def use_triton(x: torch.Tensor) -> bool:
    """Triton on CUDA tensors (and on CPU ones under TRITON_INTERPRET=1); the reference elsewhere."""
    if triton is None:
        return False
    return x.device.type == "cuda" or (INTERPRETED and x.device.type == "cpu")


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def num_warps_for(block: int) -> int:
    """Warps for a tile of `block` elements: ~8-16 elements a thread, 1 to 16 warps."""
    return min(max(block // 256, 1), 16)
