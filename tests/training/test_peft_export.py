"""An exported adapter, loaded by HF `peft` onto a HF Llama, gives the logits of our layers in that model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from ftcore.modules.lora import LoRALinear
from ftcore.training import save_peft_adapter

RANK, ALPHA = 4, 8.0
# ftcore module name -> HF module attribute path inside one decoder layer
IN_BLOCK = {
    "attn.q_proj": "self_attn.q_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.output_proj": "self_attn.o_proj",
    "mlp.w1": "mlp.gate_proj",
    "mlp.w2": "mlp.down_proj",
    "mlp.w3": "mlp.up_proj",
}


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def lora_copy_of(linear: nn.Linear, use_dora: bool) -> LoRALinear:
    layer = LoRALinear(linear.in_features, linear.out_features, RANK, ALPHA, use_dora=use_dora)
    with torch.no_grad():
        layer.weight.copy_(linear.weight)
        layer.lora_b.weight.normal_(std=0.2)  # non-zero so the adapter changes the logits
        if use_dora:
            layer.initialize_dora_magnitude()
            layer.magnitude.mul_(torch.empty_like(layer.magnitude).uniform_(0.8, 1.2))
    return layer


def swap_in_lora(hf_model, use_dora: bool) -> nn.Module:
    """Replace the target Linears of hf_model by LoRALinears; return them in an ftcore-named tree."""
    ours = nn.Module()
    ours.layers = nn.ModuleList()
    for hf_layer in hf_model.model.layers:
        block = nn.Module()
        for ftcore_name, hf_name in IN_BLOCK.items():
            hf_parent = hf_layer.get_submodule(hf_name.split(".")[0])
            layer = lora_copy_of(getattr(hf_parent, hf_name.split(".")[1]), use_dora)
            setattr(hf_parent, hf_name.split(".")[1], layer)
            group, leaf = ftcore_name.split(".")
            if not hasattr(block, group):
                block.add_module(group, nn.Module())
            getattr(block, group).add_module(leaf, layer)
        ours.layers.append(block)
    ours.output = lora_copy_of(hf_model.lm_head, use_dora)
    hf_model.lm_head = ours.output
    return ours


@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_loads_exported_adapter_with_same_logits(tmp_path, use_dora):
    peft = pytest.importorskip("peft")
    hf_model = tiny_llama()
    base_model = copy.deepcopy(hf_model)
    tokens = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    ours = swap_in_lora(hf_model, use_dora)
    with torch.no_grad():
        expected = hf_model(tokens).logits
        base_logits = base_model(tokens).logits

    save_peft_adapter(
        ours, tmp_path, rank=RANK, alpha=ALPHA, dropout=0.0, base_model_name_or_path="tiny", use_dora=use_dora
    )
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == [
        "down_proj",
        "gate_proj",
        "lm_head",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    assert config["peft_type"] == "LORA" and config["r"] == RANK and config["use_dora"] is use_dora

    peft_model = peft.PeftModel.from_pretrained(base_model, tmp_path).eval()
    with torch.no_grad():
        got = peft_model(tokens).logits
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_export_names_follow_peft_layout(tmp_path):
    from safetensors.torch import load_file

    hf_model = tiny_llama()
    ours = swap_in_lora(hf_model, use_dora=True)
    save_peft_adapter(ours, tmp_path, rank=RANK, alpha=ALPHA, use_dora=True)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight" in keys
    assert "base_model.model.lm_head.lora_magnitude_vector" in keys
    assert len(keys) == 3 * (2 * len(IN_BLOCK) + 1)
    with pytest.raises(ValueError, match="target_modules_hf"):
        save_peft_adapter(ours, tmp_path, rank=RANK, alpha=ALPHA, target_modules_hf=["q_proj"])
    with pytest.raises(ValueError, match="no LoRALinear"):
        save_peft_adapter(nn.Linear(2, 2), tmp_path, rank=RANK, alpha=ALPHA)
