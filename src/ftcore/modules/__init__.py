"""Layers: LoRALinear (modules.lora), NF4Linear (modules.nf4), losses (modules.loss).

NF4 is imported from `ftcore.modules.nf4` directly, so that LoRA-only users never load the kernels.
"""

from ftcore.modules.lora import (
    LoRALinear,
    disable_adapters,
    get_adapter_params,
    get_merged_state_dict,
    merge_lora_weights,
    set_trainable_params,
    unmerge_lora_weights,
)
from ftcore.modules.loss import IGNORE_INDEX, chunked_cross_entropy_sum, cross_entropy_sum

__all__ = [
    "IGNORE_INDEX",
    "LoRALinear",
    "chunked_cross_entropy_sum",
    "cross_entropy_sum",
    "disable_adapters",
    "get_adapter_params",
    "get_merged_state_dict",
    "merge_lora_weights",
    "set_trainable_params",
    "unmerge_lora_weights",
]
