"""Model sizes as literal data, bound to the builders with `functools.partial`.

For every size `<name>` there is `<name>(...)` (full model; accepts `quantize_base`) and
`lora_<name>(lora_attn_modules, apply_lora_to_mlp=False, apply_lora_to_output=False, lora_rank=8,
lora_alpha=16, lora_dropout=0.0, quantize_base=False, use_dora=False)`.
Numbers come from each model's published config.json / params.json.
"""

from __future__ import annotations

from functools import partial

from ftcore.models.builders import lora_transformer_decoder, transformer_decoder
from ftcore.models.transformer import Llama3RopeScaling

LLAMA3_1_ROPE = Llama3RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192
)
LLAMA3_2_ROPE = Llama3RopeScaling(
    factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192
)

_LLAMA2 = dict(vocab_size=32_000, max_seq_len=4096, rope_base=10_000.0, norm_eps=1e-5)
_LLAMA3 = dict(vocab_size=128_256, max_seq_len=8192, rope_base=500_000.0, norm_eps=1e-5)
_LLAMA3_1 = dict(_LLAMA3, max_seq_len=131_072, rope_scaling=LLAMA3_1_ROPE)
_QWEN2_5 = dict(rope_base=1_000_000.0, qkv_bias=True)

SIZES: dict[str, dict] = {
    "llama2_7b": dict(_LLAMA2, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11_008),
    "llama2_13b": dict(_LLAMA2, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, hidden_dim=13_824),
    "llama2_70b": dict(_LLAMA2, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28_672),
    "llama3_8b": dict(_LLAMA3, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14_336),
    "llama3_70b": dict(_LLAMA3, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28_672),
    "llama3_1_8b": dict(_LLAMA3_1, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14_336),
    "llama3_1_70b": dict(_LLAMA3_1, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28_672),
    "llama3_1_405b": dict(_LLAMA3_1, dim=16_384, n_layers=126, n_heads=128, n_kv_heads=8, hidden_dim=53_248),
    "llama3_2_1b": dict(
        _LLAMA3_1, rope_scaling=LLAMA3_2_ROPE, tie_embeddings=True,
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192,
    ),
    "llama3_2_3b": dict(
        _LLAMA3_1, rope_scaling=LLAMA3_2_ROPE, tie_embeddings=True,
        dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, hidden_dim=8192,
    ),
    "llama3_3_70b": dict(_LLAMA3_1, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28_672),
    "mistral_7b": dict(
        vocab_size=32_000, max_seq_len=32_768, rope_base=10_000.0, norm_eps=1e-5,
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14_336,
    ),
    "qwen2_5_0_5b": dict(
        _QWEN2_5, vocab_size=151_936, max_seq_len=32_768, norm_eps=1e-6, tie_embeddings=True,
        dim=896, n_layers=24, n_heads=14, n_kv_heads=2, hidden_dim=4864,
    ),
    "qwen2_5_1_5b": dict(
        _QWEN2_5, vocab_size=151_936, max_seq_len=131_072, norm_eps=1e-6, tie_embeddings=True,
        dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, hidden_dim=8960,
    ),
    "qwen2_5_3b": dict(
        _QWEN2_5, vocab_size=151_936, max_seq_len=32_768, norm_eps=1e-6, tie_embeddings=True,
        dim=2048, n_layers=36, n_heads=16, n_kv_heads=2, hidden_dim=11_008,
    ),
    "qwen2_5_7b": dict(
        _QWEN2_5, vocab_size=152_064, max_seq_len=131_072, norm_eps=1e-6,
        dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, hidden_dim=18_944,
    ),
    "qwen2_5_14b": dict(
        _QWEN2_5, vocab_size=152_064, max_seq_len=131_072, norm_eps=1e-5,
        dim=5120, n_layers=48, n_heads=40, n_kv_heads=8, hidden_dim=13_824,
    ),
    "qwen2_5_32b": dict(
        _QWEN2_5, vocab_size=152_064, max_seq_len=131_072, norm_eps=1e-5,
        dim=5120, n_layers=64, n_heads=40, n_kv_heads=8, hidden_dim=27_648,
    ),
    "qwen2_5_72b": dict(
        _QWEN2_5, vocab_size=152_064, max_seq_len=131_072, norm_eps=1e-5,
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=29_568,
    ),
}  # fmt: skip

llama2_7b = partial(transformer_decoder, **SIZES["llama2_7b"])
llama2_13b = partial(transformer_decoder, **SIZES["llama2_13b"])
llama2_70b = partial(transformer_decoder, **SIZES["llama2_70b"])
llama3_8b = partial(transformer_decoder, **SIZES["llama3_8b"])
llama3_70b = partial(transformer_decoder, **SIZES["llama3_70b"])
llama3_1_8b = partial(transformer_decoder, **SIZES["llama3_1_8b"])
llama3_1_70b = partial(transformer_decoder, **SIZES["llama3_1_70b"])
llama3_1_405b = partial(transformer_decoder, **SIZES["llama3_1_405b"])
llama3_2_1b = partial(transformer_decoder, **SIZES["llama3_2_1b"])
llama3_2_3b = partial(transformer_decoder, **SIZES["llama3_2_3b"])
llama3_3_70b = partial(transformer_decoder, **SIZES["llama3_3_70b"])
mistral_7b = partial(transformer_decoder, **SIZES["mistral_7b"])
qwen2_5_0_5b = partial(transformer_decoder, **SIZES["qwen2_5_0_5b"])
qwen2_5_1_5b = partial(transformer_decoder, **SIZES["qwen2_5_1_5b"])
qwen2_5_3b = partial(transformer_decoder, **SIZES["qwen2_5_3b"])
qwen2_5_7b = partial(transformer_decoder, **SIZES["qwen2_5_7b"])
qwen2_5_14b = partial(transformer_decoder, **SIZES["qwen2_5_14b"])
qwen2_5_32b = partial(transformer_decoder, **SIZES["qwen2_5_32b"])
qwen2_5_72b = partial(transformer_decoder, **SIZES["qwen2_5_72b"])

lora_llama2_7b = partial(lora_transformer_decoder, **SIZES["llama2_7b"])
lora_llama2_13b = partial(lora_transformer_decoder, **SIZES["llama2_13b"])
lora_llama2_70b = partial(lora_transformer_decoder, **SIZES["llama2_70b"])
lora_llama3_8b = partial(lora_transformer_decoder, **SIZES["llama3_8b"])
lora_llama3_70b = partial(lora_transformer_decoder, **SIZES["llama3_70b"])
lora_llama3_1_8b = partial(lora_transformer_decoder, **SIZES["llama3_1_8b"])
lora_llama3_1_70b = partial(lora_transformer_decoder, **SIZES["llama3_1_70b"])
lora_llama3_1_405b = partial(lora_transformer_decoder, **SIZES["llama3_1_405b"])
lora_llama3_2_1b = partial(lora_transformer_decoder, **SIZES["llama3_2_1b"])
lora_llama3_2_3b = partial(lora_transformer_decoder, **SIZES["llama3_2_3b"])
lora_llama3_3_70b = partial(lora_transformer_decoder, **SIZES["llama3_3_70b"])
lora_mistral_7b = partial(lora_transformer_decoder, **SIZES["mistral_7b"])
lora_qwen2_5_0_5b = partial(lora_transformer_decoder, **SIZES["qwen2_5_0_5b"])
lora_qwen2_5_1_5b = partial(lora_transformer_decoder, **SIZES["qwen2_5_1_5b"])
lora_qwen2_5_3b = partial(lora_transformer_decoder, **SIZES["qwen2_5_3b"])
lora_qwen2_5_7b = partial(lora_transformer_decoder, **SIZES["qwen2_5_7b"])
lora_qwen2_5_14b = partial(lora_transformer_decoder, **SIZES["qwen2_5_14b"])
lora_qwen2_5_32b = partial(lora_transformer_decoder, **SIZES["qwen2_5_32b"])
lora_qwen2_5_72b = partial(lora_transformer_decoder, **SIZES["qwen2_5_72b"])

__all__ = [*SIZES, *(f"lora_{name}" for name in SIZES)]
