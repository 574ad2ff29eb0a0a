"""Tiny random Hugging Face models (the independent reference) and loading them into ftcore."""

from __future__ import annotations

import torch
import transformers

import ftcore.models as M

_COMMON = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
)  # fmt: skip
LLAMA3_1_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}  # fmt: skip

# With head_dim 16 and theta 10000 the wavelengths span all three Llama 3.1 bands (kept,
# interpolated, divided by factor) for original_max_position_embeddings=64.
HF_CONFIGS = {
    "llama2": lambda: transformers.LlamaConfig(**dict(_COMMON, num_key_value_heads=4), rope_theta=10_000.0),
    "llama3_1": lambda: transformers.LlamaConfig(**_COMMON, rope_theta=10_000.0, rope_scaling=LLAMA3_1_ROPE),
    "llama3_2_tied": lambda: transformers.LlamaConfig(
        **_COMMON,
        rope_theta=500_000.0,
        rope_scaling=dict(LLAMA3_1_ROPE, factor=32.0),
        tie_word_embeddings=True,
    ),
    "mistral": lambda: transformers.MistralConfig(**_COMMON, rope_theta=10_000.0, sliding_window=None),
    "qwen2_5": lambda: transformers.Qwen2Config(**_COMMON, rope_theta=1_000_000.0, tie_word_embeddings=True),
}


def make_hf_model(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[name](), attn_implementation="eager")
    model.float().eval()
    with torch.no_grad():  # random biases and norm weights, so that a dropped tensor shows up in the logits
        for param_name, param in model.named_parameters():
            if param_name.endswith("bias") or "norm" in param_name:
                param.normal_(mean=1.0 if "norm" in param_name else 0.0, std=0.1)
    return model


def load_ftcore(checkpoint_dir, **checkpointer_args) -> M.TransformerDecoder:
    """Build on the meta device, materialize, stream the weights in (as the recipes do)."""
    with torch.device("meta"):
        model = M.from_hf_config(str(checkpoint_dir))
    model.to_empty(device="cpu")
    M.HFCheckpointer(str(checkpoint_dir), **checkpointer_args).load_into(model)
    return model.eval()
