"""Full fine-tuning: every weight trains. One GPU, CPU for tiny models, or many GPUs under torchrun.

ftcore run full_finetune --config llama3_2/1B_full
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from ftcore.runner.finetune import FinetuneSession, common_config_keys, common_runtime_args, run_recipe

CONFIG_KEYS = common_config_keys()

RUNTIME_ARGS = common_runtime_args()


def _all_trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


class FullFinetuneRecipe:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.session: FinetuneSession | None = None

    def setup(self) -> None:
        self.session = FinetuneSession(self.cfg, _all_trainable, self._write_weights, self._read_weights)

    def train(self) -> None:
        self.session.train()

    def save_checkpoint(self, tag: str) -> None:
        self.session.save_checkpoint(tag)

    def cleanup(self) -> None:
        self.session.cleanup()

    def _write_weights(self, folder) -> dict:
        """The model in the checkpointer's layout (HF safetensors); resume reads it back, so nothing extra."""
        self.session.save_model(folder / "model")
        return {}

    def _read_weights(self, folder, saved: dict) -> None:
        self.session.load_model(folder / "model")


def recipe_main(cfg: DictConfig) -> None:
    run_recipe(FullFinetuneRecipe(cfg))
