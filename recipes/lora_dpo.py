"""DPO (Direct Preference Optimization) on LoRA or QLoRA adapters: train on (chosen, rejected) answer
pairs; the reference model is the frozen base with the adapters switched off (ftcore.runner.dpo).

    ftcore run lora_dpo --config llama3_1/8B_lora_dpo
"""

from __future__ import annotations

from omegaconf import DictConfig, open_dict

from ftcore.config import instantiate
from ftcore.runner.adapters import LoRARecipe
from ftcore.runner.finetune import common_config_keys, common_runtime_args, run_recipe

CONFIG_KEYS = {**common_config_keys(), "save_merged_model": bool, "base_model_name_or_path": str}

RUNTIME_ARGS = common_runtime_args()

DEFAULT_LOSS = {"_component_": "ftcore.runner.dpo.DPOLoss", "beta": 0.1}


class LoRADPORecipe(LoRARecipe):
    def __init__(self, cfg: DictConfig):
        if cfg.get("loss") is None:
            with open_dict(cfg):
                cfg.loss = DEFAULT_LOSS
        super().__init__(cfg)

    def setup(self) -> None:
        loss = instantiate(self.cfg.loss)  # checked before any weight is read
        if not getattr(loss, "pairs", False):
            raise ValueError(
                f"config key `loss`: lora_dpo trains on preference pairs; {type(loss).__name__} is a "
                "token loss. Set loss._component_=ftcore.runner.dpo.DPOLoss, or run lora_finetune instead"
            )
        super().setup()


def recipe_main(cfg: DictConfig) -> None:
    run_recipe(LoRADPORecipe(cfg))
