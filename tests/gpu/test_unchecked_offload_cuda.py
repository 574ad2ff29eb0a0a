"""`ac_offload_blocks` on CUDA (`pytest -m gpu`): pinned host copies on a side stream, prefetch in the
backward. References: the same model unchecked and fully checkpointed (same inputs, seeds, dtype);
peak memory is `torch.cuda.max_memory_allocated` of one forward + backward after a warm-up step."""

from __future__ import annotations

import gc

import pytest
import torch

from ftcore.distributed.parallelize import parallelize
from tests.gpu.test_activation_offload_cuda import build as build_lora

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# One block saves ~16 x 4096 x 1024 x 2 bytes = 128 MiB at 4,096 tokens; its storages are >= 1 MiB.
SIZES = dict(vocab_size=512, dim=1024, n_layers=6, n_heads=8, n_kv_heads=2, hidden_dim=2816, max_seq_len=4096)


def build(dtype, quantize: bool = False, dropout: float = 0.0) -> torch.nn.Module:
    return build_lora(SIZES, dtype, dropout, quantize)


def loss_and_grads(model, tokens, seed: int):
    torch.manual_seed(seed)
    loss = model(tokens).float().square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("fused, quantize", [(False, False), (True, False), (True, True)])
def test_offloaded_blocks_give_the_unchecked_models_gradients_on_cuda(fused, quantize):
    """Bit for bit: an offloaded block runs the same kernels on exact copies of what it saved."""
    tokens = torch.randint(0, SIZES["vocab_size"], (2, 512), device="cuda")
    dtype = torch.bfloat16 if quantize else torch.float32
    reference = build(dtype, quantize, dropout=0.1)
    parallelize(reference, fused_kernels=fused)
    model = build(dtype, quantize, dropout=0.1)
    parallelize(model, fused_kernels=fused, activation_checkpointing=True, ac_offload_blocks=4)
    for step in range(2):  # the second step reuses the pinned buffers and the prefetch chain
        ref_loss, ref_grads = loss_and_grads(reference, tokens, seed=step)
        loss, grads = loss_and_grads(model, tokens, seed=step)
        assert torch.equal(loss, ref_loss)
        assert ref_grads.keys() == grads.keys()
        for name in ref_grads:
            assert torch.equal(grads[name], ref_grads[name]), name


def peak_gib(**options) -> float:
    model = build(torch.bfloat16)
    parallelize(model, fused_kernels=True, **options)
    tokens = torch.randint(0, SIZES["vocab_size"], (1, 4096), device="cuda")
    loss_and_grads(model, tokens, seed=0)  # warm-up: Triton compiles, pinned buffers cached
    torch.cuda.synchronize()
    gc.collect()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss_and_grads(model, tokens, seed=1)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def test_offloaded_blocks_keep_no_activations_on_the_gpu():
    """All six blocks offloaded peak near full checkpointing (one block's working set plus the copies in
    flight), far under the unchecked model, which keeps six blocks' activations."""
    unchecked = peak_gib()
    checkpointed = peak_gib(activation_checkpointing=True)
    offloaded = peak_gib(activation_checkpointing=True, ac_offload_blocks=6)
    one_block = (unchecked - checkpointed) / (SIZES["n_layers"] - 1)
    assert unchecked > checkpointed + 4 * one_block
    assert offloaded < checkpointed + 2.5 * one_block, (unchecked, checkpointed, offloaded)
