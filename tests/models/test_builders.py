"""Builders: published parameter counts (from each model card / config), and LoRA targeting."""

from __future__ import annotations

import pytest
import torch

import ftcore.models as M

# Parameter counts as published (safetensors metadata on the Hugging Face model pages).
PUBLISHED_PARAMETER_COUNTS = {
    "llama2_7b": 6_738_415_616,
    "llama3_1_8b": 8_030_261_248,
    "llama3_2_1b": 1_235_814_400,
    "mistral_7b": 7_241_732_096,
    "qwen2_5_0_5b": 494_032_768,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETER_COUNTS))
def test_parameter_count_matches_published(name):
    with torch.device("meta"):
        model = getattr(M, name)()
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETER_COUNTS[name]


@pytest.mark.parametrize("name", M.MODEL_SIZES)
def test_every_size_builds_plain_and_lora_on_meta(name):
    with torch.device("meta"):
        plain = getattr(M, name)()
        lora = getattr(M, f"lora_{name}")(["q_proj", "v_proj"], lora_rank=4)
    assert isinstance(plain, M.TransformerDecoder) and len(lora.layers) == len(plain.layers)


def test_lora_targets_only_the_named_projections():
    from ftcore.modules.lora import LoRALinear

    model = M.lora_tiny_llama(["q_proj", "output_proj"], apply_lora_to_mlp=True, tie_embeddings=False,
                              apply_lora_to_output=True)  # fmt: skip
    attn, mlp = model.layers[0].attn, model.layers[0].mlp
    assert isinstance(attn.q_proj, LoRALinear) and isinstance(attn.output_proj, LoRALinear)
    assert type(attn.k_proj) is torch.nn.Linear and type(attn.v_proj) is torch.nn.Linear
    assert all(isinstance(m, LoRALinear) for m in (mlp.w1, mlp.w2, mlp.w3, model.output))


def test_quantize_base_keeps_a_float_base_where_rows_are_no_multiple_of_the_nf4_block(caplog):
    from ftcore.modules.lora import LoRALinear
    from ftcore.modules.nf4 import NF4Linear

    sizes = dict(vocab_size=32, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=172, max_seq_len=16)
    with torch.device("meta"), caplog.at_level("WARNING", logger="ftcore"):
        plain = M.transformer_decoder(quantize_base=True, **sizes)
        lora = M.lora_transformer_decoder(["q_proj"], apply_lora_to_mlp=True, quantize_base=True, **sizes)
    mlp = plain.layers[0].mlp
    assert isinstance(mlp.w1, NF4Linear) and isinstance(mlp.w3, NF4Linear) and type(mlp.w2) is torch.nn.Linear
    assert isinstance(plain.layers[0].attn.k_proj, NF4Linear)
    w1, w2 = lora.layers[0].mlp.w1, lora.layers[0].mlp.w2
    assert isinstance(w1, LoRALinear) and isinstance(w2, LoRALinear)
    assert w1.quantize_base and not w2.quantize_base
    assert "w2 (in_dim 172)" in caplog.text


def test_lora_builder_rejects_bad_targets():
    with pytest.raises(ValueError, match="unknown entries.*'o_proj'"):
        M.lora_tiny_llama(["q_proj", "o_proj"])
    with pytest.raises(ValueError, match="untied output"):
        M.lora_tiny_llama(["q_proj"], apply_lora_to_output=True, tie_embeddings=True)


def test_rope_buffer_is_recomputed_after_meta_materialization():
    reference = M.tiny_llama()
    with torch.device("meta"):
        model = M.tiny_llama()
    model.to_empty(device="cpu")
    M.init_weights(model)
    for ours, expected in zip(model.modules(), reference.modules()):
        if hasattr(ours, "inv_freq"):
            assert ours.inv_freq.dtype == torch.float32 and torch.equal(ours.inv_freq, expected.inv_freq)
    assert "inv_freq" not in " ".join(model.state_dict())
