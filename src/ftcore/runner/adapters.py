"""What the LoRA recipes (fine-tuning and DPO) share: which parameters train, and how a checkpoint
folder holds them (the adapter in PEFT's format, plus the exact tensors for resume)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from ftcore.modules.lora import get_adapter_params, get_merged_state_dict, set_trainable_params
from ftcore.runner.finetune import FinetuneSession
from ftcore.training.peft_export import save_peft_adapter


def lora_trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Freeze everything but the LoRA adapters; return them."""
    adapter = get_adapter_params(model)
    if not adapter:
        raise ValueError(
            "the model has no LoRA adapters: use a lora_* builder in the `model` config "
            "(e.g. ftcore.models.lora_llama3_1_8b) with lora_attn_modules set"
        )
    set_trainable_params(model, adapter)
    return list(adapter.values())


def write_adapter(session, cfg: DictConfig, folder: Path) -> dict:
    """Write the adapter in PEFT's format; return the tensors that an exact resume needs."""
    model_cfg = cfg.model
    names = set(get_adapter_params(session.parts.model))
    model = session.unsharded_model(keys=names)  # None on ranks other than 0 of a sharded run
    if model is None:
        return {}
    save_peft_adapter(
        model,
        folder / "adapter",
        rank=model_cfg.lora_rank,
        alpha=model_cfg.lora_alpha,
        dropout=model_cfg.get("lora_dropout", 0.0),
        use_dora=model_cfg.get("use_dora", False),
        base_model_name_or_path=cfg.get("base_model_name_or_path"),
    )
    return {name: p.detach().clone() for name, p in get_adapter_params(model).items()}


def read_adapter(session, folder: Path, saved: dict) -> None:
    """Put the saved adapter back; a sharded model keeps its shard of each tensor (load hooks)."""
    model = session.parts.model
    params = get_adapter_params(model)
    expected = set(params)
    if unknown := sorted(set(saved) - expected):
        raise ValueError(f"{folder}: saved adapter tensors {unknown[:4]} are not in the model's adapters")
    if missing := sorted(expected - set(saved)):
        raise ValueError(
            f"{folder}: the checkpoint lacks adapter tensors {missing[:4]} (of {len(missing)}); resuming would "
            "start them fresh under a trained optimizer state. Check the LoRA settings match the run that saved it"
        )
    # a DTensor's shape is the whole tensor's, as saved
    if mismatched := [n for n in sorted(saved) if tuple(saved[n].shape) != tuple(params[n].shape)]:
        name = mismatched[0]
        raise ValueError(
            f"{folder}: adapter tensor {name} was saved with shape {tuple(saved[name].shape)}, this run's is "
            f"{tuple(params[name].shape)} ({len(mismatched)} tensors differ). Resume with the LoRA settings "
            "(model.lora_rank, targets) of the run that saved it, or start a new run"
        )
    model.load_state_dict(saved, strict=False)


class LoRARecipe:
    """The LoRA recipes' body: build the session with the adapters trainable, train, and export the
    merged model when `save_merged_model` is set. lora_finetune uses it as is; lora_dpo adds its loss."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.session: FinetuneSession | None = None

    def setup(self) -> None:
        self.session = FinetuneSession(
            self.cfg,
            lora_trainable,
            lambda folder: write_adapter(self.session, self.cfg, folder),
            lambda folder, saved: read_adapter(self.session, folder, saved),
        )

    def train(self) -> None:
        session = self._built()
        session.train()
        if self.cfg.get("save_merged_model", False):
            model = session.unsharded_model()  # None on ranks other than 0 of a sharded run
            session.save_final_model(get_merged_state_dict(model) if model is not None else {})

    def save_checkpoint(self, tag: str) -> None:
        self._built().save_checkpoint(tag)

    def cleanup(self) -> None:
        self._built().cleanup()

    def _built(self) -> FinetuneSession:
        if self.session is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before training or saving")
        return self.session
