"""The fused NF4 matmul and the dequantize variants on CUDA at Llama-3.1-8B sizes (`pytest -m gpu`).

References: an fp64 matmul on the reference's dequantized weight (`nf4_reference`, run on the same CUDA
tensors), and the reference's dequantized bits for the dequantize variants and for one-hot inputs.
"""

from __future__ import annotations

import pytest
import torch

from ftcore import kernels
from ftcore.kernels import nf4_reference as ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# bf16: the output's one rounding; fp32: IEEE dot, summation order only (K = 4096 terms).
TOLERANCE = {torch.bfloat16: dict(rtol=2**-8, atol=1e-4), torch.float32: dict(rtol=1e-4, atol=1e-4)}


def _weight(shape, seed=0):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    return ref.quantize_nf4(w.cuda())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 64, 4096])
@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 4096)])
def test_fused_nf4_matmul_matches_fp64_reference_on_cuda(shape, m, dtype):
    from ftcore.kernels import nf4_matmul_triton as mm

    n, k = shape
    parts = _weight(shape)
    w = ref.dequantize_nf4(parts, dtype).double()  # (N, K)
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
    g = torch.randn(m, n, device="cuda", generator=gen).to(dtype)
    b = torch.randn(n, device="cuda", generator=gen).to(dtype)
    torch.testing.assert_close(
        mm.nf4_matmul(x, parts, b).double(), x.double() @ w.T + b.double(), **TOLERANCE[dtype]
    )
    torch.testing.assert_close(
        mm.nf4_matmul_grad_input(g, parts).double(), g.double() @ w, **TOLERANCE[dtype]
    )


@pytest.mark.parametrize("m", [1, 64, 4096])
def test_fused_tiles_hold_exactly_the_reference_bf16_weights_on_cuda(m):
    from ftcore.kernels import nf4_matmul_triton as mm

    parts = _weight((4096, 4096), seed=2)
    w = ref.dequantize_nf4(parts, torch.bfloat16)
    eye = torch.eye(4096, dtype=torch.bfloat16, device="cuda")[:m]  # one-hot rows select single weights
    assert torch.equal(mm.nf4_matmul(eye, parts), w.T[:m])
    assert torch.equal(mm.nf4_matmul_grad_input(eye, parts), w[:m])


@pytest.mark.parametrize("m", [1, 4096])
def test_nf4_linear_fused_and_dequant_paths_agree_on_cuda(monkeypatch, m):
    parts = _weight((1024, 4096), seed=3)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    results = {}
    for path in ("fused", "dequant"):
        monkeypatch.setattr(kernels, "NF4_MATMUL_PATH", path)
        leaf = x.clone().requires_grad_(True)
        y = kernels.nf4_linear(leaf, parts)
        y.backward(g)
        results[path] = (y.float(), leaf.grad.float())
    for fused, dequant in zip(results["fused"], results["dequant"]):  # both round one fp32 sum to bf16
        torch.testing.assert_close(fused, dequant, rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 4096), (14336, 4096)])
@pytest.mark.parametrize(
    "variant,elements,warps",
    [("tile", 8192, 4), ("words", 4096, 4), ("words", 16384, 8), ("persistent", 2048, 4)],
)
def test_dequantize_variants_bit_identical_on_cuda(variant, elements, warps, shape, dtype):
    from ftcore.kernels import nf4_triton

    parts = _weight(shape, seed=4)
    got = nf4_triton.dequantize_nf4(
        parts, dtype, elements_per_program=elements, num_warps=warps, variant=variant
    )
    assert torch.equal(got, ref.dequantize_nf4(parts, dtype))
