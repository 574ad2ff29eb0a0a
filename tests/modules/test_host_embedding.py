"""`offload_embedding`: the frozen token table in host memory (ftcore.modules.host_embedding), on the CPU.

The GPU half (rows read in place from pinned memory, no GPU memory for the table, a CUDA graph) is in
tests/gpu/test_host_embedding_cuda.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ftcore.models.builders import lora_tiny_llama
from ftcore.models.transformer import init_weights
from ftcore.modules.host_embedding import (
    HostEmbedding,
    compute_device,
    cuda_view,
    host_parameters,
    offload_token_embedding,
)
from ftcore.modules.lora import get_adapter_params, set_trainable_params


def _frozen_embedding() -> nn.Embedding:
    torch.manual_seed(0)
    embedding = nn.Embedding(50, 8)
    embedding.weight.requires_grad_(False)
    return embedding


def _lora_model(tied: bool) -> nn.Module:
    torch.manual_seed(0)
    model = lora_tiny_llama(["q_proj", "v_proj"], vocab_size=64, n_layers=1, tie_embeddings=tied)
    init_weights(model)
    set_trainable_params(model, get_adapter_params(model))
    return model


def test_lookups_and_state_dict_are_those_of_the_embedding():
    embedding = _frozen_embedding()
    host = HostEmbedding.from_embedding(embedding)
    tokens = torch.tensor([[0, 49, 7], [7, 3, 3]])
    assert torch.equal(host(tokens), embedding(tokens))
    assert list(host.state_dict()) == ["weight"] and not host.weight.requires_grad
    replacement = torch.randn(50, 8)
    host.load_state_dict({"weight": replacement})  # as a checkpointer loads it: in place
    assert torch.equal(host(tokens), replacement[tokens])


def test_the_table_stays_on_the_host_through_moves_and_materialization():
    host = HostEmbedding(50, 8, dtype=torch.float32)
    assert host.weight.is_meta
    host.to_empty(device="meta")  # what a meta build's materialization calls, whatever the device
    assert host.weight.device.type == "cpu" and host.weight.shape == (50, 8)
    host.to("meta")
    assert host.weight.device.type == "cpu"
    host.to(torch.bfloat16)  # a dtype change is applied, on the host
    assert host.weight.dtype == torch.bfloat16 and host.weight.device.type == "cpu"


def test_the_model_computes_the_same_with_the_table_offloaded():
    model = _lora_model(tied=False)
    tokens = torch.randint(0, 64, (2, 5))
    expected = model(tokens)
    offload_token_embedding(model)
    assert isinstance(model.tok_embeddings, HostEmbedding)
    assert host_parameters(model) == {model.tok_embeddings.weight}
    assert torch.equal(model(tokens), expected)
    model.to("meta")  # the rest of the model moves; the table does not
    assert model.tok_embeddings.weight.device.type == "cpu"
    assert compute_device(model) == torch.device("meta")  # where the blocks are, not the table


def test_a_tied_or_trained_embedding_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="ties its output projection.*offload_embedding: false"):
        offload_token_embedding(_lora_model(tied=True))
    model = _lora_model(tied=False)
    model.tok_embeddings.weight.requires_grad_(True)  # as full fine-tuning trains it
    with pytest.raises(ValueError, match="needs a frozen token embedding.*offload_embedding: false"):
        offload_token_embedding(model)


def test_a_table_a_gpu_cannot_read_in_place_is_refused():
    with pytest.raises(RuntimeError, match="not in pinned host memory"):
        cuda_view(torch.zeros(4, 2), torch.device("cuda"))


def test_a_table_set_to_train_after_the_offload_is_refused_at_lookup():
    # on CUDA the rows come from a view the parameter does not own: it would silently get no gradient
    host = HostEmbedding.from_embedding(_frozen_embedding())
    host.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="must stay frozen.*offload_embedding: false"):
        host(torch.tensor([[1, 2]]))


def test_a_token_table_that_is_not_a_plain_embedding_is_refused_naming_its_type():
    class ScaledEmbedding(nn.Embedding):
        pass

    model = _lora_model(tied=False)
    model.tok_embeddings = ScaledEmbedding(64, model.tok_embeddings.embedding_dim)
    model.tok_embeddings.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="tok_embeddings is a ScaledEmbedding.*offload_embedding: false"):
        offload_token_embedding(model)


def test_fsdp_without_ignored_params_is_refused_naming_the_torch_version(monkeypatch):
    from ftcore.distributed import fsdp

    monkeypatch.setattr(fsdp, "fully_shard", lambda module, *, mesh=None, reshard_after_forward=None: module)
    with pytest.raises(ValueError, match="needs torch >= 2.7.*offload_embedding: false"):
        fsdp._check_fsdp_can_ignore_params()
