"""Full checkpointing's recompute without the closing projection's GEMMs, on CUDA (`pytest -m gpu`).

References: the same model without checkpointing (autograd's plain graph; bf16, so to rounding) in
eager and in a graphed step, and the GEMMs the backward runs, counted by a dispatch mode.
"""

from __future__ import annotations

import pytest
import torch

from ftcore.runner.loss import LanguageModelLoss
from ftcore.training.accumulation import eager_micro_step
from ftcore.training.cuda_graphs import CudaGraphedMicroStep
from tests.gpu.test_cuda_graphs_cuda import batches, train
from tests.gpu.test_selective_checkpoint_cuda import CUDA, build, loss_and_grads
from tests.training.test_selective_checkpoint import CountGemms

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("quantize", [False, True], ids=["lora", "qlora"])
def test_full_checkpointing_matches_no_checkpointing(quantize):
    batch = batches(1, seq=512)[0]
    ref_loss, ref = loss_and_grads(build(quantize, checkpointing=False), batch)
    loss, grads = loss_and_grads(build(quantize), batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=1e-3)
    assert grads.keys() == ref.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref[name], rtol=2e-2, atol=2e-4, msg=name)


def test_the_recompute_runs_all_but_the_down_projections_gemms():
    batch = batches(1, seq=256)[0]
    counts = {}
    for checkpointing in (False, True):
        model = build(checkpointing=checkpointing)
        loss_sum, count = LanguageModelLoss(chunk_size=256)(model, batch)
        gemms = CountGemms()
        with gemms:
            (loss_sum / count).backward()
        counts[checkpointing] = gemms.count
    # 7 LoRA layers a block, 3 GEMMs each in the forward (base, A, B); the recompute leaves out the
    # down projection's base and B GEMMs
    assert counts[True] - counts[False] == (7 * 3 - 2) * len(model.layers)


def test_a_graphed_checkpointed_step_matches_the_eager_unchecked_one():
    data = batches(3, seq=256)
    loss = LanguageModelLoss(chunk_size=64, skip_ignored=False)
    eager_model, graphed_model = build(checkpointing=False), build()
    eager = train(eager_model, eager_micro_step(lambda batch: loss(eager_model, batch)), data, 1)
    params = [p for p in graphed_model.parameters() if p.requires_grad]
    step = CudaGraphedMicroStep(lambda batch: loss(graphed_model, batch), params, CUDA)
    graphed = train(graphed_model, step, data, 1)
    assert step.num_graphs == 1
    assert graphed == pytest.approx(eager, rel=2e-3)
