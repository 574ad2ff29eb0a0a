"""Selective activation checkpointing on CUDA (`pytest -m gpu`); skipped without CUDA.

References: the same model under full checkpointing (same kernels, same batch: the kept GEMM outputs
are the values a rerun recomputes, so gradients agree to rounding), and its peak memory beside the
unchecked model's; the graphed step against the eager step of the same `op` model.
"""

from __future__ import annotations

import pytest
import torch

from ftcore.runner.loss import LanguageModelLoss
from ftcore.training.accumulation import eager_micro_step
from ftcore.training.cuda_graphs import CudaGraphedMicroStep
from tests.gpu.test_cuda_graphs_cuda import batches, train
from tests.gpu.test_cuda_graphs_cuda import build as build_lora_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SIZES = dict(vocab_size=512, dim=512, n_layers=4, n_heads=8, n_kv_heads=2, hidden_dim=1408, max_seq_len=1024)
CUDA = torch.device("cuda")
SELECTIVE_OP = {"ac_mode": "selective", "ac_option": "op"}


def build(quantize: bool = False, checkpointing: bool = True, **options) -> torch.nn.Module:
    return build_lora_model(
        checkpointing=checkpointing, sizes=SIZES, dtype=torch.bfloat16, quantize=quantize, **options
    )


def loss_and_grads(model, batch):
    loss_fn = LanguageModelLoss(chunk_size=256)
    loss_sum, count = loss_fn(model, batch)
    (loss_sum / count).backward()
    return loss_sum.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "quantize, options",
    [
        (False, SELECTIVE_OP),
        (True, SELECTIVE_OP),
        (False, {"ac_mode": "selective", "ac_option": 2}),
        (True, {"ac_skip_last_blocks": 2}),
    ],
    ids=["lora-op", "qlora-op", "lora-every-2", "qlora-skip-last-2"],
)
def test_selective_checkpointing_matches_full_checkpointing(quantize, options):
    batch = batches(1, seq=512)[0]
    ref_loss, ref = loss_and_grads(build(quantize), batch)
    loss, grads = loss_and_grads(build(quantize, **options), batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=1e-3)
    assert grads.keys() == ref.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref[name], rtol=2e-2, atol=2e-4, msg=name)


def test_op_policy_peaks_between_full_checkpointing_and_none():
    batch = batches(1, seq=1024)[0]
    peaks = {}
    for name, options in (("full", {}), ("op", SELECTIVE_OP), ("none", {"checkpointing": False})):
        model = build(**options)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss_and_grads(model, batch)
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - before
        del model
        torch.cuda.empty_cache()
    assert peaks["full"] < peaks["op"] < peaks["none"], peaks


def test_graphed_op_policy_matches_its_eager_steps():
    data = batches(4, seq=256)
    eager_model, graphed_model = build(**SELECTIVE_OP), build(**SELECTIVE_OP)
    loss = LanguageModelLoss(chunk_size=64, skip_ignored=False)

    def micro_step_of(model):
        return lambda batch: loss(model, batch)

    eager = train(eager_model, eager_micro_step(micro_step_of(eager_model)), data, 1)
    params = [p for p in graphed_model.parameters() if p.requires_grad]
    step = CudaGraphedMicroStep(micro_step_of(graphed_model), params, CUDA)
    graphed = train(graphed_model, step, data, 1)
    assert step.num_graphs == 1
    assert graphed == pytest.approx(eager, rel=1e-3)


def test_op_policy_under_compile_matches_eager():
    batch = batches(1, seq=256)[0]
    ref_loss, ref = loss_and_grads(build(**SELECTIVE_OP), batch)
    loss, grads = loss_and_grads(build(compile=True, **SELECTIVE_OP), batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-2)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref[name], rtol=5e-2, atol=1e-3, msg=name)
