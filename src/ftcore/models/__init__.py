"""ftcore models: the decoder, builders per family and size, checkpointers and generation."""

from ftcore.models import families as _families
from ftcore.models.builders import (
    LORA_ATTN_MODULES,
    lora_tiny_llama,
    lora_transformer_decoder,
    tiny_llama,
    transformer_decoder,
)
from ftcore.models.checkpoint_gguf import GGUFCheckpointer, from_gguf, lora_from_gguf
from ftcore.models.checkpoint_hf import HFCheckpointer, from_hf_config, lora_from_hf_config
from ftcore.models.checkpoint_meta import MetaCheckpointer
from ftcore.models.families import *  # noqa: F403  (every llama2_7b, lora_llama2_7b, ... builder)
from ftcore.models.generation import generate, sample_next
from ftcore.models.transformer import Llama3RopeScaling, TransformerDecoder, init_weights, reset_buffers

MODEL_SIZES = tuple(_families.SIZES)

__all__ = [
    "LORA_ATTN_MODULES",
    "MODEL_SIZES",
    "GGUFCheckpointer",
    "HFCheckpointer",
    "Llama3RopeScaling",
    "MetaCheckpointer",
    "TransformerDecoder",
    "from_gguf",
    "from_hf_config",
    "generate",
    "init_weights",
    "lora_from_gguf",
    "lora_from_hf_config",
    "lora_tiny_llama",
    "lora_transformer_decoder",
    "reset_buffers",
    "sample_next",
    "tiny_llama",
    "transformer_decoder",
    *MODEL_SIZES,
    *(f"lora_{name}" for name in MODEL_SIZES),
]
