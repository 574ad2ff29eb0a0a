"""LoRA and QLoRA fine-tuning: a frozen base (bf16, or NF4 when the model config sets quantize_base)
with trainable low-rank adapters. One GPU, CPU for tiny models, or many GPUs under torchrun.

    ftcore run lora_finetune --config llama3_1/8B_lora
"""

from __future__ import annotations

from omegaconf import DictConfig

from ftcore.runner.adapters import LoRARecipe
from ftcore.runner.finetune import common_config_keys, common_runtime_args, run_recipe

CONFIG_KEYS = {**common_config_keys(), "save_merged_model": bool, "base_model_name_or_path": str}

RUNTIME_ARGS = common_runtime_args()


class LoRAFinetuneRecipe(LoRARecipe):
    """Adapters trained on the language-model loss (the `loss` key; LanguageModelLoss when unset)."""


def recipe_main(cfg: DictConfig) -> None:
    run_recipe(LoRAFinetuneRecipe(cfg))
