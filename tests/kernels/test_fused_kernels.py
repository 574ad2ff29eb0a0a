"""Fused RMSNorm / SwiGLU / RoPE: the Triton kernels under the interpreter (subprocess), the operators'
registrations (opcheck), the switch on a tiny Llama (reference path, AC, compile), and user errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ftcore.distributed.parallelize import speed_options
from ftcore.kernels import fused_norm, fused_rope, fused_swiglu
from ftcore.models.transformer import FeedForward, RMSNorm, RotaryEmbedding
from ftcore.modules.fused import apply_fused_kernels
from tests.kernels.fused_reference import compare_fused_model, loss_and_grads, rope_tables, tiny_models
from tests.kernels.interpreter import run_interpreted_cases

CASES = Path(__file__).with_name("fused_kernels_interpret_cases.py")


def test_triton_kernels_match_float64_formulas_under_interpreter():
    pytest.importorskip("triton")
    run_interpreted_cases(CASES, timeout_s=600)


@pytest.mark.parametrize("weight_grad", [True, False])
def test_operator_registrations_pass_opcheck(weight_grad):
    # fake (meta) shapes and strides, autograd registration and schema of every operator, on CPU
    x = torch.randn(5, 3, 24, requires_grad=True)
    weight = torch.randn(24, requires_grad=weight_grad)
    torch.library.opcheck(fused_norm._rms_norm_op, (x, weight, 1e-5))
    rstd = torch.rand(5, 3) + 0.5
    # the backward operators have no autograd formula of their own (no double backward): plain inputs
    backward_args = (torch.randn(5, 3, 24), x.detach(), weight.detach(), rstd, weight_grad)
    torch.library.opcheck(fused_norm._rms_norm_backward_op, backward_args)
    gate, up = torch.randn(4, 33, requires_grad=True), torch.randn(4, 33, requires_grad=True)
    torch.library.opcheck(fused_swiglu._swiglu_op, (gate, up))
    torch.library.opcheck(fused_swiglu._swiglu_backward_op, (torch.randn(4, 33), gate.detach(), up.detach()))
    q = torch.randn(2, 6, 3, 16).transpose(1, 2).requires_grad_(True)  # (B, H, T, D) view
    cos, sin = rope_tables(2, 6, 16, torch.float32)
    torch.library.opcheck(fused_rope._rope_op, (q, cos, sin, False))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fused_switch_on_the_reference_path_matches_plain_model(lora):
    (loss, grads), (fused_loss, fused_grads) = compare_fused_model(lora, activation_checkpointing=True)
    torch.testing.assert_close(fused_loss, loss, rtol=1e-6, atol=1e-6)
    assert fused_grads.keys() == grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_apply_fused_kernels_swaps_forwards_and_keeps_the_state_dict():
    plain, fused = tiny_models(lora=True, n_layers=3)
    assert apply_fused_kernels(fused) == 3 * 2 + 1 + 3 + 3  # 2 norms a block + final norm, 3 MLPs, 3 ropes
    assert fused.state_dict().keys() == plain.state_dict().keys()
    for module in fused.modules():
        if type(module) in (RMSNorm, FeedForward, RotaryEmbedding):
            assert "forward" in vars(module), type(module).__name__
    fused.load_state_dict(plain.state_dict())  # checkpoints load unchanged


def test_fused_model_under_compile_matches_eager():
    # aot_eager traces the operators through their fake implementations and autograd formulas
    _, fused = tiny_models(lora=False)
    apply_fused_kernels(fused)
    compiled = tiny_models(lora=False)[1]
    apply_fused_kernels(compiled)
    compiled.forward = torch.compile(compiled.forward, backend="aot_eager", fullgraph=True)
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(2))
    (loss, grads), (compiled_loss, compiled_grads) = (
        loss_and_grads(fused, tokens),
        loss_and_grads(compiled, tokens),
    )
    torch.testing.assert_close(compiled_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, msg=name)


def test_speed_options_reads_fused_kernels_and_defaults_off():
    assert speed_options(OmegaConf.create({"fused_kernels": True}))["fused_kernels"] is True
    assert speed_options(OmegaConf.create({}))["fused_kernels"] is False


def test_mismatched_inputs_raise_value_errors_naming_the_fix():
    with pytest.raises(ValueError, match="same output size and dtype"):
        fused_swiglu.swiglu(torch.randn(2, 8), torch.randn(2, 9))
    cos, sin = rope_tables(1, 4, 8, torch.float32)
    with pytest.raises(ValueError, match="even head_dim"):
        fused_rope.rope(torch.randn(1, 2, 5, 8), cos, sin)  # 5 positions, angles for 4
