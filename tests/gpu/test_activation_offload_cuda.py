"""Activation offloading and the chunked MLP on CUDA (`pytest -m gpu`); skipped without CUDA.

Here the offload is real: pinned host copies on a side stream, prefetch in the backward. References:
plain per-block `torch.utils.checkpoint` (non-reentrant) on the same model, inputs and RNG seeds, in
fp32 with dropout (the CUDA RNG replay); peak memory is `torch.cuda.max_memory_allocated` of one
forward + backward after a warm-up step, at a sequence length where the saved block inputs dominate.
"""

from __future__ import annotations

import gc

import pytest
import torch

from ftcore.distributed.parallelize import parallelize
from ftcore.models import init_weights
from ftcore.models.builders import lora_transformer_decoder
from ftcore.modules.lora import get_adapter_params, set_trainable_params

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SMALL = dict(vocab_size=256, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, hidden_dim=704, max_seq_len=4096)
# Saved block inputs: 16 x 16384 x 2048 x 2 bytes = 1 GiB; one block's working set is a few hundred MiB.
LONG = dict(
    vocab_size=1024, dim=2048, n_layers=16, n_heads=16, n_kv_heads=4, hidden_dim=5632, max_seq_len=16384
)


def build(sizes: dict, dtype, dropout: float = 0.0, quantize: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = lora_transformer_decoder(
            ["q_proj", "k_proj", "v_proj", "output_proj"],
            apply_lora_to_mlp=True,
            lora_rank=8,
            lora_dropout=dropout,
            quantize_base=quantize,
            **sizes,
        )
    init_weights(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_b" in name:
                param.normal_(0.0, 0.02)  # non-zero, so the adapters' gradients depend on the whole block
    set_trainable_params(model, get_adapter_params(model))
    return model.to(dtype)


def loss_and_grads(model, tokens, seed: int):
    torch.manual_seed(seed)
    loss = model(tokens).square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("compile, mlp_chunk", [(False, None), (False, 300), (True, None), (True, 300)])
def test_offloading_gives_the_gradients_of_plain_checkpointing_on_cuda(compile, mlp_chunk):
    """Both sides chunk the MLP alike (300 does not divide 2 x 1024 tokens); compile on the offloaded side."""
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 1024), device="cuda")
    dropout = 0.0 if compile else 0.1  # compiled dropout draws differently from eager
    reference = build(SMALL, torch.float32, dropout)
    parallelize(reference, activation_checkpointing=True, mlp_chunk_tokens=mlp_chunk)
    model = build(SMALL, torch.float32, dropout)
    parallelize(
        model,
        activation_checkpointing=True,
        activation_offloading=True,
        compile=compile,
        mlp_chunk_tokens=mlp_chunk,
    )
    # eager: the same kernels recompute the same numbers; compiled: fused, in another order
    tol = dict(rtol=1e-4, atol=1e-5) if compile else dict(rtol=1e-5, atol=1e-6)
    for step in range(2):  # the second step reuses the pinned buffers and the prefetch chain
        ref_loss, ref_grads = loss_and_grads(reference, tokens, seed=step)
        loss, grads = loss_and_grads(model, tokens, seed=step)
        torch.testing.assert_close(loss, ref_loss, **tol)
        assert grads.keys() == ref_grads.keys() and grads
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], **tol, msg=name)


def peak_gib(model, tokens) -> float:
    loss_and_grads(model, tokens, seed=0)  # warm-up: pinned buffers, cuBLAS workspaces
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()  # weights (and anything not yet freed): not the step's
    loss_and_grads(model, tokens, seed=0)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - resident) / 2**30


def test_offloading_and_chunking_lower_peak_memory_at_long_context():
    tokens = torch.randint(0, LONG["vocab_size"], (1, 16384), device="cuda")
    peaks = {}
    for name, options in {
        "checkpoint": dict(activation_checkpointing=True),
        "offload": dict(activation_checkpointing=True, activation_offloading=True),
        "offload+chunk": dict(
            activation_checkpointing=True, activation_offloading=True, mlp_chunk_tokens=2048
        ),
    }.items():
        model = build(LONG, torch.bfloat16)
        parallelize(model, **options)
        peaks[name] = peak_gib(model, tokens)
        del model
        gc.collect()  # the patched forwards make reference cycles: free the model before the next one
        torch.cuda.empty_cache()
    print("peak GiB:", {k: round(v, 3) for k, v in peaks.items()})
    saved_inputs_gib = LONG["n_layers"] * 16384 * LONG["dim"] * 2 / 2**30  # 1 GiB
    mlp_intermediate_gib = 16384 * LONG["hidden_dim"] * 2 / 2**30  # one (T, hidden) bf16 tensor
    assert peaks["offload"] < peaks["checkpoint"] - 0.5 * saved_inputs_gib
    assert peaks["offload+chunk"] < peaks["offload"] - mlp_intermediate_gib
