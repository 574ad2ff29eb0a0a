"""`offload_embedding` on CUDA (`pytest -m gpu`): the GPU reads the pinned host table in place.

References: the same table as a CUDA `nn.Embedding` (lookups must be bit-identical: a gather copies
rows), and the same LoRA model trained with the table on the GPU (equal losses and adapters, a peak
lower by the table's bytes). Skipped without CUDA.
"""

from __future__ import annotations

import gc

import pytest
import torch

from ftcore.distributed.parallelize import parallelize
from ftcore.models import init_weights
from ftcore.models.builders import lora_transformer_decoder
from ftcore.modules.host_embedding import HostEmbedding
from ftcore.modules.lora import get_adapter_params, set_trainable_params
from ftcore.runner.loss import LanguageModelLoss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# An untied table of 64K x 2048 bf16 = 256 MiB, large beside the rest of a 2-block model.
SIZES = dict(
    vocab_size=65536, dim=2048, n_layers=2, n_heads=16, n_kv_heads=4, hidden_dim=5632, max_seq_len=512
)


def _cuda_embedding() -> torch.nn.Embedding:
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(65536, 2048, device="cuda", dtype=torch.bfloat16)
    embedding.weight.requires_grad_(False)
    return embedding


def test_cuda_lookups_read_the_host_table_in_place_and_bit_identically():
    embedding = _cuda_embedding()
    tokens = torch.randint(0, 65536, (4, 512), device="cuda")
    expected = embedding(tokens)
    before = torch.cuda.memory_allocated()
    host = HostEmbedding.from_embedding(embedding)
    del embedding
    gc.collect()
    assert host.weight.is_pinned()
    looked_up = host(tokens)  # the first lookup makes the CUDA view: it must alias, not copy, the table
    assert before - torch.cuda.memory_allocated() >= 65536 * 2048 * 2 - looked_up.nbytes  # the table left
    assert torch.equal(looked_up, expected)
    assert looked_up.device == tokens.device


def test_a_table_replaced_by_assignment_is_read_from_its_new_memory():
    host = HostEmbedding.from_embedding(_cuda_embedding())
    tokens = torch.randint(0, 65536, (2, 64), device="cuda")
    host(tokens)  # a view of the first table is made and kept
    replacement = torch.randn(65536, 2048, dtype=torch.bfloat16).pin_memory()
    host.load_state_dict({"weight": replacement}, assign=True)
    assert torch.equal(host(tokens), replacement.cuda()[tokens])


def test_a_cuda_graph_replays_lookups_of_new_tokens():
    embedding = _cuda_embedding()
    host = HostEmbedding.from_embedding(embedding)
    tokens = torch.randint(0, 65536, (2, 256), device="cuda")
    host(tokens)  # the CUDA view is made outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = host(tokens)
    tokens.copy_(torch.randint(0, 65536, (2, 256), device="cuda"))
    graph.replay()
    assert torch.equal(out, embedding(tokens))


def _train(offload: bool, steps: int = 3) -> tuple[list[float], dict, int]:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = lora_transformer_decoder(["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=8, **SIZES)
    init_weights(model)
    model.to(torch.bfloat16)
    set_trainable_params(model, get_adapter_params(model))
    parallelize(model, activation_checkpointing=True, offload_embedding=offload)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    loss_fn = LanguageModelLoss()
    generator = torch.Generator(device="cuda").manual_seed(1)
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, SIZES["vocab_size"], (2, 512), device="cuda", generator=generator)
        loss_sum, count = loss_fn(model, {"tokens": tokens, "labels": tokens})
        (loss_sum / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss_sum.detach() / count))
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, adapters, torch.cuda.max_memory_allocated()


def test_a_lora_run_trains_the_same_with_a_peak_lower_by_the_table():
    plain_losses, plain_adapters, plain_peak = _train(offload=False)
    gc.collect()
    losses, adapters, peak = _train(offload=True)
    assert losses == plain_losses
    for name, tensor in plain_adapters.items():
        assert torch.equal(adapters[name], tensor), name
    assert any(t.abs().sum() > 0 for n, t in adapters.items() if "lora_b" in n)  # it trained (B starts at 0)
    table = SIZES["vocab_size"] * SIZES["dim"] * 2
    assert plain_peak - peak >= 0.95 * table, (plain_peak, peak)
