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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 8])
@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096), (1024, 4096)])
def test_nf4_gemv_matches_fp64_reference_on_cuda(shape, m, dtype):
    from ftcore.kernels import nf4_gemv_triton as gv

    n, k = shape
    parts = _weight(shape, seed=5)
    w = ref.dequantize_nf4(parts, dtype).double()  # (N, K)
    gen = torch.Generator(device="cuda").manual_seed(6)
    x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
    b = torch.randn(n, device="cuda", generator=gen).to(dtype)
    expected = x.double() @ w.T + b.double()
    tolerance = dict(rtol=2**-8 if dtype == torch.bfloat16 else 2**-10, atol=1e-4)
    auto = gv.pick_gemv_config(m, n, k, x.device)
    for config in (None, auto._replace(split=1), gv.GemvConfig(32, 512, 3, 8)):  # default, unsplit, split
        torch.testing.assert_close(gv.nf4_gemv(x, parts, b, config).double(), expected, **tolerance)


@pytest.mark.parametrize("m", [1, 8])
def test_nf4_gemv_reproduces_the_reference_bf16_weights_on_cuda(m):
    from ftcore.kernels import nf4_gemv_triton as gv

    parts = _weight((4096, 4096), seed=7)
    w = ref.dequantize_nf4(parts, torch.bfloat16)
    for first in (0, 2040, 4096 - m):  # one-hot rows select single columns of W
        eye = torch.eye(4096, dtype=torch.bfloat16, device="cuda")[first : first + m]
        assert torch.equal(gv.nf4_gemv(eye, parts), w.T[first : first + m])


def test_nf4_linear_auto_takes_the_gemv_for_few_tokens_on_cuda(monkeypatch):
    from ftcore.kernels import nf4_gemv_triton as gv

    calls = []
    real = gv.nf4_gemv
    monkeypatch.setattr(gv, "nf4_gemv", lambda x, *a, **kw: calls.append(x.shape[0]) or real(x, *a, **kw))
    parts = _weight((1024, 4096), seed=8)
    w = ref.dequantize_nf4(parts, torch.bfloat16).double()
    for tokens in (1, kernels.NF4_GEMV_MAX_TOKENS, kernels.NF4_GEMV_MAX_TOKENS + 1):
        monkeypatch.setattr(kernels, "NF4_MATMUL_PATH", "auto")
        x = torch.randn(1, tokens, 4096, device="cuda", dtype=torch.bfloat16)  # (B, T, in)
        y = kernels.nf4_linear(x, parts)
        torch.testing.assert_close(y.double(), x.double() @ w.T, rtol=2**-8, atol=1e-4)
    assert calls == [1, kernels.NF4_GEMV_MAX_TOKENS]  # more tokens: dequantize + cuBLAS


def test_generation_decodes_through_the_nf4_gemv_on_cuda(monkeypatch):
    # A random tiny QLoRA-style model (NF4 block projections): greedy decoding with every projection on the
    # GEMV gives the tokens dequantize + cuBLAS gives (fp32: summation order only); in bf16 auto mode the
    # decode steps (2 tokens) take the GEMV and the prefill (2 x 6 tokens > NF4_GEMV_MAX_TOKENS) does not.
    from ftcore import models
    from ftcore.kernels import nf4_gemv_triton as gv
    from ftcore.models.generation import generate

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = models.tiny_llama(dim=256, n_heads=4, n_kv_heads=2, hidden_dim=768, quantize_base=True)
    models.transformer.init_weights(model, std=0.2)  # 0.02 decodes one token over and over
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # cuBLAS in true fp32
    prompts = [[5, 17, 42, 9, 3, 77], [8, 2, 11]]
    tokens = {}
    for path in ("gemv", "dequant"):
        monkeypatch.setattr(kernels, "NF4_MATMUL_PATH", path)
        tokens[path] = generate(model, prompts, max_new_tokens=8)
    assert tokens["gemv"] == tokens["dequant"] and all(len(row) == 8 for row in tokens["gemv"])
    assert len(set(tokens["gemv"][0] + tokens["gemv"][1])) > 4, tokens  # a comparison that can tell
    calls = []
    real = gv.nf4_gemv
    monkeypatch.setattr(gv, "nf4_gemv", lambda x, *a, **kw: calls.append(x.shape[0]) or real(x, *a, **kw))
    monkeypatch.setattr(kernels, "NF4_MATMUL_PATH", "auto")
    monkeypatch.setattr(kernels, "NF4_GEMV_MAX_TOKENS", 8)  # prefill (12 tokens) above, decode (2) below
    for parameter in model.parameters():  # bf16 activations; the NF4 buffers stay as they are
        parameter.data = parameter.data.bfloat16()
    bf16_tokens = generate(model, prompts, max_new_tokens=8)
    assert all(len(row) == 8 for row in bf16_tokens)
    assert calls and set(calls) == {2}, calls  # 7 decode steps x 7 NF4 projections x 2 layers, 2 tokens each
    assert len(calls) == 7 * 7 * 2
