"""Cases run by test_nf4_matmul_interpret.py in a subprocess with TRITON_INTERPRET=1 (set before triton is imported).

The fused NF4 matmul against an fp64 matmul on the reference's dequantized weight, the dequantize layout
variants against the reference bit for bit, and the NF4 linear's dispatch, on CPU through the interpreter.
"""

from __future__ import annotations

import os

import pytest
import torch

from ftcore.kernels import nf4_reference as ref

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "run through test_nf4_matmul_interpret.py (needs TRITON_INTERPRET=1)", allow_module_level=True
    )

from ftcore import kernels  # noqa: E402
from ftcore.kernels import nf4_matmul_triton as mm  # noqa: E402
from ftcore.kernels import nf4_triton as tri  # noqa: E402

# fp32: IEEE dot, only the summation order differs; bf16: the output's one rounding (2**-8 relative).
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2**-8, atol=1e-5)}
SHAPES = [(64, 128), (192, 64), (128, 256)]  # (N, K): non-square, tails in both tile directions


def weight(n: int, k: int, seed: int = 0, **quant) -> ref.NF4Parts:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02
    w[0, :3] = 0.5  # an outlier block
    return ref.quantize_nf4(w, **quant)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,shape,bias", [(1, SHAPES[0], False), (1, SHAPES[1], True), (5, SHAPES[0], True),
                                          (5, SHAPES[2], False), (33, SHAPES[1], False), (33, SHAPES[2], True)])  # fmt: skip
def test_fused_forward_and_grad_input_match_fp64_reference(m, shape, bias, dtype):
    n, k = shape
    parts = weight(n, k, seed=m)
    w = ref.dequantize_nf4(parts, dtype).double()  # (N, K): the values the dot must use
    gen = torch.Generator().manual_seed(1)
    x, g = torch.randn(m, k, generator=gen).to(dtype), torch.randn(m, n, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    expected = x.double() @ w.T + (b.double() if bias else 0)
    y = mm.nf4_matmul(x, parts, b)
    assert y.dtype == dtype and y.shape == (m, n)
    torch.testing.assert_close(y.double(), expected, **TOLERANCE[dtype])
    grad_x = mm.nf4_matmul_grad_input(g, parts)
    assert grad_x.dtype == dtype and grad_x.shape == (m, k)
    torch.testing.assert_close(grad_x.double(), g.double() @ w, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_tiles_hold_exactly_the_reference_weights(dtype):
    # One-hot rows pick single weights out of the dot: any rounding or nibble-order slip shows exactly.
    parts = weight(128, 192, seed=3)
    w = ref.dequantize_nf4(parts, dtype)  # (N, K)
    assert torch.equal(mm.nf4_matmul(torch.eye(192, dtype=dtype)[:40], parts), w.T[:40])
    assert torch.equal(mm.nf4_matmul_grad_input(torch.eye(128, dtype=dtype)[5:38], parts), w[5:38])


@pytest.mark.parametrize(
    "config",
    [
        mm.MatmulConfig(16, 64, 64, 3, 4, 2),
        mm.MatmulConfig(32, 128, 128, 2, 4, 3),
        mm.MatmulConfig(64, 64, 64, 1, 4, 1),
    ],
    ids=["split3", "split2-wide", "unsplit"],
)
@pytest.mark.parametrize(
    "quant", [{}, {"block_size": 128}, {"double_quant": False}], ids=["bnb", "block128", "no-dq"]
)
def test_fused_tilings_and_formats_never_change_the_result(config, quant):
    parts = weight(192, 384, seed=4, **quant)  # 3 K-tiles of 128: a split leaves one part short
    w = ref.dequantize_nf4(parts, torch.float32).double()
    gen = torch.Generator().manual_seed(5)
    x, g, b = (
        torch.randn(5, 384, generator=gen),
        torch.randn(5, 192, generator=gen),
        torch.randn(192, generator=gen),
    )
    torch.testing.assert_close(
        mm.nf4_matmul(x, parts, b, config).double(), x.double() @ w.T + b.double(), **TOLERANCE[torch.float32]
    )
    torch.testing.assert_close(
        mm.nf4_matmul_grad_input(g, parts, config).double(), g.double() @ w, **TOLERANCE[torch.float32]
    )


def test_fused_takes_zero_tokens():
    assert mm.nf4_matmul(torch.randn(0, 128), weight(64, 128)).shape == (0, 64)


def test_fused_rejects_what_it_cannot_take():
    with pytest.raises(ValueError, match="whole"):
        mm.nf4_matmul(
            torch.randn(2, 96), ref.quantize_nf4(torch.randn(2, 96), block_size=64)
        )  # 96 = 1.5 blocks
    with pytest.raises(ValueError, match="2-D input"):
        mm.nf4_matmul(torch.randn(2, 3, 64), weight(64, 64))


def test_dispatch_rule_fuses_small_token_counts_on_cuda_only(monkeypatch):
    parts, cuda = weight(64, 128), torch.device("cuda")
    monkeypatch.setattr(kernels, "NF4_MATMUL_PATH", "auto")
    assert kernels.use_fused_nf4_matmul(1, parts, torch.bfloat16, cuda)
    assert kernels.use_fused_nf4_matmul(kernels.FUSED_NF4_MAX_TOKENS, parts, torch.bfloat16, cuda)
    assert not kernels.use_fused_nf4_matmul(kernels.FUSED_NF4_MAX_TOKENS + 1, parts, torch.bfloat16, cuda)
    assert not kernels.use_fused_nf4_matmul(1, parts, torch.bfloat16, torch.device("cpu"))
    assert kernels.use_fused_nf4_matmul(1, parts, torch.float16, cuda)
    assert not kernels.use_fused_nf4_matmul(1, parts, torch.float32, cuda)  # cuBLAS' fp32 is faster
    assert not kernels.use_fused_nf4_matmul(1, parts, torch.float64, cuda)
    monkeypatch.setattr(kernels, "NF4_MATMUL_PATH", "dequant")
    assert not kernels.use_fused_nf4_matmul(1, parts, torch.bfloat16, cuda)
    monkeypatch.setattr(kernels, "NF4_MATMUL_PATH", "fastest")
    with pytest.raises(ValueError, match="FTCORE_NF4_MATMUL"):
        kernels.use_fused_nf4_matmul(1, parts, torch.bfloat16, cuda)


@pytest.mark.parametrize("path", ["fused", "dequant"])
def test_nf4_linear_forward_and_backward_through_the_forced_path(monkeypatch, path):
    calls = []
    for name in ("nf4_matmul", "nf4_matmul_grad_input"):
        real = getattr(mm, name)
        monkeypatch.setattr(
            mm, name, lambda *a, real=real, name=name, **kw: calls.append(name) or real(*a, **kw)
        )
    monkeypatch.setattr(kernels, "NF4_MATMUL_PATH", path)
    parts = weight(192, 128, seed=6)
    w = ref.dequantize_nf4(parts, torch.float32).double()
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 128, generator=gen).requires_grad_(True)  # (B, T, in): 6 tokens
    b = torch.randn(192, generator=gen).requires_grad_(True)
    g = torch.randn(2, 3, 192, generator=gen)
    y = kernels.nf4_linear(x, parts, b)
    y.backward(g)
    assert calls == (["nf4_matmul", "nf4_matmul_grad_input"] if path == "fused" else [])
    torch.testing.assert_close(y.double(), x.double() @ w.T + b.double(), **TOLERANCE[torch.float32])
    torch.testing.assert_close(x.grad.double(), g.double() @ w, **TOLERANCE[torch.float32])
    torch.testing.assert_close(b.grad, g.sum((0, 1)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "variant,elements,warps,per_sm",
    [
        ("tile", 1024, 4, 4),
        ("words", 256, 2, 4),
        ("words", 8192, 4, 4),
        ("persistent", 256, 4, 1),
        ("persistent", 512, 2, 2),
    ],
)
def test_dequantize_variants_bit_identical(variant, elements, warps, per_sm, dtype):
    # 40 x 192 = 120 blocks: partial last tile; persistent with 1-2 programs per (interpreted) SM loops.
    w = torch.randn(40, 192, generator=torch.Generator().manual_seed(8)) * 0.02
    w[5, :64] = 0  # an all-zero block
    for parts in (
        ref.quantize_nf4(w),
        ref.quantize_nf4(w, double_quant=False),
        ref.quantize_nf4(w, block_size=128),
    ):
        got = tri.dequantize_nf4(
            parts,
            dtype,
            elements_per_program=elements,
            num_warps=warps,
            variant=variant,
            programs_per_sm=per_sm,
        )
        assert torch.equal(got, ref.dequantize_nf4(parts, dtype))


def test_dequantize_rejects_an_unknown_variant():
    with pytest.raises(ValueError, match="variant must be one of"):
        tri.dequantize_nf4(weight(4, 64), variant="fastest")
