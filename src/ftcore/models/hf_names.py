"""Parameter names: ftcore <-> Hugging Face Llama/Mistral/Qwen2 (`LlamaForCausalLM` layout).

Only the module path is translated; whatever follows it (`weight`, `bias`, or a LoRA suffix such
as `lora_a.weight`) is passed through unchanged, so the PEFT exporter can reuse these functions.
"""

from __future__ import annotations

import re

_TOP_LEVEL = {
    "tok_embeddings": "model.embed_tokens",
    "norm": "model.norm",
    "output": "lm_head",
}
_IN_BLOCK = {
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.output_proj": "self_attn.o_proj",
    "mlp.w1": "mlp.gate_proj",
    "mlp.w2": "mlp.down_proj",
    "mlp.w3": "mlp.up_proj",
    "attn_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
}
_TOP_LEVEL_BACK = {hf: ours for ours, hf in _TOP_LEVEL.items()}
_IN_BLOCK_BACK = {hf: ours for ours, hf in _IN_BLOCK.items()}

_OURS_BLOCK = re.compile(r"^layers\.(\d+)\.(" + "|".join(map(re.escape, _IN_BLOCK)) + r")(\..+)$")
_HF_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(" + "|".join(map(re.escape, _IN_BLOCK_BACK)) + r")(\..+)$")
_OURS_TOP = re.compile(r"^(" + "|".join(_TOP_LEVEL) + r")(\..+)$")
_HF_TOP = re.compile(r"^(" + "|".join(map(re.escape, _TOP_LEVEL_BACK)) + r")(\..+)$")


def ftcore_to_hf(key: str) -> str:
    """`layers.0.attn.q_proj.weight` -> `model.layers.0.self_attn.q_proj.weight`."""
    if match := _OURS_BLOCK.match(key):
        layer, module, rest = match.groups()
        return f"model.layers.{layer}.{_IN_BLOCK[module]}{rest}"
    if match := _OURS_TOP.match(key):
        return _TOP_LEVEL[match.group(1)] + match.group(2)
    raise ValueError(f"no Hugging Face name for ftcore parameter {key!r}")


def hf_to_ftcore(key: str) -> str:
    """`model.layers.0.mlp.gate_proj.weight` -> `layers.0.mlp.w1.weight`."""
    if match := _HF_BLOCK.match(key):
        layer, module, rest = match.groups()
        return f"layers.{layer}.{_IN_BLOCK_BACK[module]}{rest}"
    if match := _HF_TOP.match(key):
        return _TOP_LEVEL_BACK[match.group(1)] + match.group(2)
    raise ValueError(
        f"unexpected tensor {key!r} in the Hugging Face checkpoint: ftcore knows Llama, Mistral and "
        "Qwen2 names (model.embed_tokens, model.layers.N.self_attn/mlp/..., model.norm, lm_head)"
    )
