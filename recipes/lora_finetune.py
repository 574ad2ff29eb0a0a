"""LoRA and QLoRA fine-tuning: a frozen base (bf16, or NF4 when the model config sets quantize_base)
with trainable low-rank adapters. One GPU, CPU for tiny models, or many GPUs under torchrun.

    ftcore run lora_finetune --config llama3_1/8B_lora
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from ftcore.modules.lora import get_adapter_params, get_merged_state_dict, set_trainable_params
from ftcore.runner.finetune import FinetuneSession, common_config_keys, common_runtime_args, run_recipe
from ftcore.training.peft_export import save_peft_adapter

CONFIG_KEYS = {**common_config_keys(), "save_merged_model": bool, "base_model_name_or_path": str}

RUNTIME_ARGS = common_runtime_args()


def _lora_trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    adapter = get_adapter_params(model)
    if not adapter:
        raise ValueError(
            "the model has no LoRA adapters: use a lora_* builder in the `model` config "
            "(e.g. ftcore.models.lora_llama3_1_8b) with lora_attn_modules set"
        )
    set_trainable_params(model, adapter)
    return list(adapter.values())


class LoRAFinetuneRecipe:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.session: FinetuneSession | None = None

    def setup(self) -> None:
        self.session = FinetuneSession(self.cfg, _lora_trainable, self._write_weights, self._read_weights)

    def train(self) -> None:
        self.session.train()
        if self.cfg.get("save_merged_model", False):
            model = self.session.unsharded_model()  # None on ranks other than 0 of a sharded run
            self.session.save_final_model(get_merged_state_dict(model) if model is not None else {})

    def save_checkpoint(self, tag: str) -> None:
        self.session.save_checkpoint(tag)

    def cleanup(self) -> None:
        self.session.cleanup()

    def _write_weights(self, folder) -> dict:
        """Write the adapter in PEFT's format; return the tensors that an exact resume needs."""
        model_cfg = self.cfg.model
        names = set(get_adapter_params(self.session.parts.model))
        model = self.session.unsharded_model(keys=names)  # None on ranks other than 0 of a sharded run
        if model is None:
            return {}
        save_peft_adapter(
            model,
            folder / "adapter",
            rank=model_cfg.lora_rank,
            alpha=model_cfg.lora_alpha,
            dropout=model_cfg.get("lora_dropout", 0.0),
            use_dora=model_cfg.get("use_dora", False),
            base_model_name_or_path=self.cfg.get("base_model_name_or_path"),
        )
        return {name: p.detach().clone() for name, p in get_adapter_params(model).items()}

    def _read_weights(self, folder, saved: dict) -> None:
        """Put the saved adapter back; a sharded model keeps its shard of each tensor (load hooks)."""
        model = self.session.parts.model
        expected = set(get_adapter_params(model))
        if unknown := sorted(set(saved) - expected):
            raise ValueError(f"{folder}: saved adapter tensors {unknown[:4]} are not in the model's adapters")
        if missing := sorted(expected - set(saved)):
            raise ValueError(
                f"{folder}: the checkpoint lacks adapter tensors {missing[:4]} (of {len(missing)}); resuming would "
                "start them fresh under a trained optimizer state. Check the LoRA settings match the run that saved it"
            )
        model.load_state_dict(saved, strict=False)


def recipe_main(cfg: DictConfig) -> None:
    run_recipe(LoRAFinetuneRecipe(cfg))
