"""Cases run by test_nf4_matmul_interpret.py in a subprocess with TRITON_INTERPRET=1 (set before triton is imported).

The fused NF4 matmul and the NF4 GEMV against an fp64 matmul on the reference's dequantized weight, the
dequantize layout variants against the reference bit for bit, and the NF4 linear's dispatch, on CPU through
the interpreter.
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
from ftcore.kernels import nf4_gemv_triton as gv  # noqa: E402
from ftcore.kernels import nf4_matmul_triton as mm  # noqa: E402
from ftcore.kernels import nf4_triton as tri  # noqa: E402

# fp32: IEEE dot, only the summation order differs; bf16: the output's one rounding (2**-8 relative).
TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2**-8, atol=1e-5),
    torch.float16: dict(rtol=2**-11, atol=1e-5),
}
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


GEMV_CONFIGS = [gv.GemvConfig(16, 64, 1, 4), gv.GemvConfig(32, 128, 3, 4), gv.GemvConfig(8, 256, 2, 2)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize(
    "shape,config",
    [((64, 128), None), ((200, 192), GEMV_CONFIGS[0]), ((72, 384), GEMV_CONFIGS[1]), ((40, 640), GEMV_CONFIGS[2])],
    ids=["auto-cfg", "unsplit-n-tail", "split3", "split2-k-tail"],
)  # fmt: skip
def test_gemv_matches_fp64_reference(shape, config, m, dtype):
    # N = 200, 72, 40 leave a partial row block; K = 640 / 256 leaves a partial last K step.
    n, k = shape
    parts = weight(n, k, seed=m + n)
    w = ref.dequantize_nf4(parts, dtype).double()  # (N, K): the values the products must use
    gen = torch.Generator().manual_seed(9)
    x, b = torch.randn(m, k, generator=gen).to(dtype), torch.randn(n, generator=gen).to(dtype)
    bias = b if m != 3 else None
    y = gv.nf4_gemv(x, parts, bias, config)
    assert y.dtype == dtype and y.shape == (m, n)
    expected = x.double() @ w.T + (b.double() if bias is not None else 0)
    torch.testing.assert_close(y.double(), expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "config", [None, GEMV_CONFIGS[0], GEMV_CONFIGS[2]], ids=["auto-cfg", "unsplit", "split2"]
)
def test_gemv_one_hot_rows_reproduce_the_reference_weights(config, dtype):
    # Each one-hot row selects one column of W: any rounding, nibble-order or absmax slip shows exactly.
    parts = weight(96, 320, seed=10)
    w = ref.dequantize_nf4(parts, dtype)  # (N, K)
    for cols in (slice(61, 69), slice(312, 320), slice(100, 101)):  # a block boundary, the last K step, M = 1
        eye = torch.eye(320, dtype=dtype)[cols]  # (8, K)
        assert torch.equal(gv.nf4_gemv(eye, parts, config=config), w.T[cols])


@pytest.mark.parametrize("quant", [{"block_size": 128}, {"double_quant": False}], ids=["block128", "no-dq"])
def test_gemv_other_nf4_formats(quant):
    parts = weight(48, 512, seed=11, **quant)
    w = ref.dequantize_nf4(parts, torch.float32).double()
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(12))
    for config in (
        None,
        gv.GemvConfig(16, 64, 1, 4),
        gv.GemvConfig(16, 128, 2, 4),
    ):  # 64 < block 128: widened
        torch.testing.assert_close(gv.nf4_gemv(x, parts, config=config).double(), x.double() @ w.T)


def test_gemv_rejects_what_it_cannot_take():
    with pytest.raises(ValueError, match="1 <= M"):
        gv.nf4_gemv(torch.randn(gv.MAX_TOKENS + 1, 128), weight(64, 128))
    with pytest.raises(ValueError, match="1 <= M"):
        gv.nf4_gemv(torch.randn(0, 128), weight(64, 128))
    with pytest.raises(ValueError, match="whole"):
        gv.nf4_gemv(torch.randn(1, 96), ref.quantize_nf4(torch.randn(2, 96)))  # 96 = 1.5 blocks


def test_dispatch_rule_on_cuda_only(monkeypatch):
    parts, cuda, cpu = weight(64, 128), torch.device("cuda"), torch.device("cpu")
    bf16 = torch.bfloat16

    def path(tokens, dtype=bf16, device=cuda, grad_input=False):
        return kernels.nf4_matmul_path(tokens, parts, dtype, device, grad_input=grad_input)

    monkeypatch.setattr(kernels, "NF4_MATMUL_PATH", "auto")
    # The shipped thresholds: GEMV for a few tokens, the tiled kernel never, cuBLAS for the rest.
    max_gemv = kernels.NF4_GEMV_MAX_TOKENS
    assert path(1) == path(max_gemv) == path(1, torch.float16) == "gemv"
    assert path(max_gemv + 1) == path(4096) == path(0) == "dequant"
    assert path(1, device=cpu) == path(1, torch.float32) == path(1, torch.float64) == "dequant"
    assert path(1, grad_input=True) == "dequant" and not kernels.use_fused_nf4_matmul(1, parts, bf16, cuda)
    # The tiled kernel's own threshold (0 today) still works when set.
    monkeypatch.setattr(kernels, "FUSED_NF4_MAX_TOKENS", 64)
    assert path(max_gemv) == "gemv" and path(max_gemv + 1) == path(64) == "fused"
    assert path(1, grad_input=True) == path(64, grad_input=True) == "fused" and path(65) == "dequant"
    assert kernels.use_fused_nf4_matmul(64, parts, bf16, cuda)
    assert not kernels.use_fused_nf4_matmul(65, parts, bf16, cuda)
    assert path(1, torch.float32) == path(1, device=cpu) == "dequant"
    monkeypatch.setattr(kernels, "NF4_GEMV_MAX_TOKENS", 0)
    assert path(1) == "fused"
    monkeypatch.setattr(kernels, "FUSED_NF4_MAX_TOKENS", 0)
    assert path(1) == "dequant"
    # Forced paths.
    monkeypatch.setattr(kernels, "NF4_MATMUL_PATH", "gemv")  # wherever the GEMV takes the call
    assert path(1, torch.float32, cpu) == path(gv.MAX_TOKENS) == "gemv"
    assert path(gv.MAX_TOKENS + 1) == path(1, grad_input=True) == "dequant"
    monkeypatch.setattr(kernels, "NF4_MATMUL_PATH", "fused")
    assert path(1) == path(4096, grad_input=True) == "fused"
    monkeypatch.setattr(kernels, "NF4_MATMUL_PATH", "dequant")
    assert path(1) == "dequant" and not kernels.use_fused_nf4_matmul(1, parts, bf16, cuda)
    monkeypatch.setattr(kernels, "NF4_MATMUL_PATH", "fastest")
    with pytest.raises(ValueError, match="FTCORE_NF4_MATMUL"):
        path(1)


@pytest.mark.parametrize("path", ["gemv", "fused", "dequant"])
def test_nf4_linear_forward_and_backward_through_the_forced_path(monkeypatch, path):
    calls = []
    for module, name in ((mm, "nf4_matmul"), (mm, "nf4_matmul_grad_input"), (gv, "nf4_gemv")):
        real = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda *a, real=real, name=name, **kw: calls.append(name) or real(*a, **kw)
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
    expected_calls = {"gemv": ["nf4_gemv"], "fused": ["nf4_matmul", "nf4_matmul_grad_input"], "dequant": []}
    assert calls == expected_calls[path]
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
