"""Build every part of a fine-tuning run from its config, in the order that fails fast.

Cheap, error-prone parts (tokenizer, datasets) come before the model, so a bad data file or a
tokenizer that does not fit the model stops the run before any weight is read.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig

from ftcore.config import instantiate
from ftcore.distributed.parallelize import parallelize, speed_options
from ftcore.runner.loop import LoopSettings
from ftcore.runner.setup import build_loader, build_model, resolve_device, resolve_dtype, seed_everything
from ftcore.runner.sharded import build_sharded_model, join_process_group, main_rank_first
from ftcore.training.optim_in_backward import OptimizerInBackward, check_optimizer_in_backward

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from ftcore.training.loggers import MetricLogger

log = logging.getLogger("ftcore")


@dataclass
class RunParts:
    cfg: DictConfig
    device: torch.device
    dtype: torch.dtype
    rank: int
    world_size: int
    sharded: bool  # started by torchrun: the model is sharded with FSDP2 across `world_size` ranks
    output_dir: Path
    tokenizer: object
    checkpointer: object | None
    model: torch.nn.Module
    train_loader: object
    train_sampler: object
    val_loader: DataLoader | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    logger: MetricLogger
    loss_fn: Callable
    settings: LoopSettings
    # the config's loss object: `pairs` (preference pairs, averaged per pair), `count_units`, `pop_metrics`
    loss: object = None
    # None: eager; else the `cuda_graphs` step (ftcore.training.cuda_graphs)
    micro_step: Callable | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def loop_settings(cfg: DictConfig) -> LoopSettings:
    return LoopSettings(
        epochs=cfg.get("epochs", 1),
        max_steps=cfg.get("max_steps"),
        batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.get("gradient_accumulation_steps", 1),
        clip_grad_norm=cfg.get("clip_grad_norm"),
        log_every_n_steps=cfg.get("log_every_n_steps", 1),
        eval_every_n_steps=cfg.get("eval_every_n_steps"),
        save_every_n_steps=cfg.get("save_every_n_steps"),
        early_stopping_patience=cfg.get("early_stopping_patience"),
    )


class _SilentLogger:
    """What ranks other than 0 log to: nothing, so every metric is written once."""

    def log(self, metrics, step) -> None:
        pass

    def close(self) -> None:
        pass


def build_logger(cfg: DictConfig, output_dir: Path, is_main: bool):
    """The config's `metric_logger` (one component or a list; stdout by default) plus metrics.jsonl,
    which is always written: the loss-curve plot reads it."""
    from ftcore.training import JSONLLogger, MultiLogger, build_metric_logger

    if not is_main:
        return _SilentLogger()
    configured = build_metric_logger(cfg.get("metric_logger"))
    metrics_file = (output_dir / "metrics.jsonl").resolve()
    loggers = configured.loggers if isinstance(configured, MultiLogger) else [configured]
    if any(isinstance(x, JSONLLogger) and x.path.resolve() == metrics_file for x in loggers):
        return configured  # the config already writes metrics.jsonl: a second writer would double each line
    return MultiLogger([configured, JSONLLogger(metrics_file)])


def build_parts(cfg: DictConfig, select_trainable: Callable[[torch.nn.Module], list]) -> RunParts:
    """Build the run. `select_trainable(model)` freezes what must stay frozen and returns the trainable parameters."""
    settings = loop_settings(cfg)  # checks the schedule keys before anything is built
    options = speed_options(cfg)  # and the speed/memory switches
    env = join_process_group(cfg)  # None in a single process, which never touches torch.distributed
    sharded = env is not None
    if cfg.get("optimizer_in_backward", False):  # refused combinations fail before the model is built
        check_optimizer_in_backward(settings.gradient_accumulation_steps, settings.clip_grad_norm, sharded)
    rank, world_size = (env.rank, env.world_size) if sharded else (0, 1)
    device = env.device if sharded else resolve_device(cfg.get("device", "auto"))
    if cfg.get("cuda_graphs", False):
        from ftcore.training.cuda_graphs import check_cuda_graphs

        check_cuda_graphs(
            device,
            compile=options["compile"],
            activation_offloading=options["activation_offloading"],
            sharded=sharded,
            optimizer_in_backward=cfg.get("optimizer_in_backward", False),
            optimizer_component=str(cfg.optimizer.get("_component_", "")),
            offloaded_blocks=bool(options["ac_offload_blocks"]),
        )
    dtype = resolve_dtype(cfg.get("dtype", "bf16"), device)
    seed = cfg.get("seed", 0)
    seed_everything(seed)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    from ftcore.data.collate import padded_collate, preference_collate

    loss = _build_loss(cfg)
    pairs = getattr(loss, "pairs", False)
    if pairs and cfg.get("cuda_graphs", False):
        raise ValueError("cuda_graphs: a preference loss (DPO) runs eagerly; set cuda_graphs=false")
    with main_rank_first(sharded):
        tokenizer = instantiate(cfg.tokenizer)
        train_set = instantiate(cfg.dataset, tokenizer)
        val_set = instantiate(cfg.dataset_val, tokenizer) if cfg.get("dataset_val") is not None else None
    _check_items_fit_loss(train_set, cfg.dataset, loss, "dataset")
    if val_set is not None:
        _check_items_fit_loss(val_set, cfg.dataset_val, loss, "dataset_val")
    batch_size = settings.batch_size
    collate = functools.partial(preference_collate if pairs else padded_collate, pad_id=tokenizer.pad_id)
    shuffle = cfg.get("shuffle", True)
    train_loader, train_sampler = build_loader(
        train_set, collate, batch_size, shuffle, seed, rank, world_size
    )
    val_loader = None
    if val_set is not None:
        val_loader, _ = build_loader(
            val_set, collate, batch_size, False, seed, rank, world_size, name="dataset_val", training=False
        )

    checkpointer = instantiate(cfg.checkpointer) if cfg.get("checkpointer") is not None else None
    if sharded:

        def check_then_select(model):
            _check_vocab(tokenizer, model)
            return select_trainable(model)

        model, trainable = build_sharded_model(cfg, device, dtype, checkpointer, check_then_select)
    else:
        model = build_model(cfg.model, device, dtype, checkpointer, seed)
        _check_vocab(tokenizer, model)
        trainable = select_trainable(model)
        parallelize(model, **options)

    optimizer = _build_optimizer(cfg, trainable, settings, sharded)
    total_steps = settings.total_steps(len(train_loader))
    scheduler = None
    if cfg.get("lr_scheduler") is not None:
        scheduler = instantiate(cfg.lr_scheduler, optimizer, num_training_steps=total_steps)
    loss_fn = _on_device(loss, device)
    micro_step = _build_graphed_step(cfg, model, trainable, optimizer, device)
    logger = build_logger(cfg, output_dir, rank == 0)
    return RunParts(
        cfg,
        device,
        dtype,
        rank,
        world_size,
        sharded,
        output_dir,
        tokenizer,
        checkpointer,
        model,
        train_loader,
        train_sampler,
        val_loader,
        optimizer,
        scheduler,
        logger,
        loss_fn,
        settings,
        loss,
        micro_step,
    )


def _build_optimizer(cfg: DictConfig, trainable: list, settings: LoopSettings, sharded: bool):
    """The config's optimizer over the trainable parameters; with `optimizer_in_backward`, one per
    parameter, stepped in the backward (ftcore.training.optim_in_backward)."""
    if cfg.get("optimizer_in_backward", False):
        return OptimizerInBackward(trainable, lambda params: instantiate(cfg.optimizer, params))
    optimizer = instantiate(cfg.optimizer, trainable)
    if hasattr(optimizer, "check_loop_settings"):  # e.g. CPU offload: it sees each gradient in the backward
        optimizer.check_loop_settings(settings.gradient_accumulation_steps, settings.clip_grad_norm, sharded)
    return optimizer


def _build_graphed_step(cfg: DictConfig, model, trainable: list, optimizer, device):
    """With `cuda_graphs: true`, the micro-step that replays forward + backward from CUDA graphs; its
    loss keeps static shapes (evaluation keeps the loss that skips masked positions)."""
    if not cfg.get("cuda_graphs", False):
        return None
    from ftcore.training.cuda_graphs import graphed_micro_step

    loss = _build_loss(cfg)
    if hasattr(loss, "skip_ignored"):
        loss.skip_ignored = False  # keep the loss's shapes independent of the labels, so a graph captures it
    loss_fn = _on_device(loss, device)
    return graphed_micro_step(lambda batch: loss_fn(model, batch), trainable, optimizer, device, model)


def _check_vocab(tokenizer, model) -> None:
    from ftcore.data.tokenizers import check_vocab_matches

    check_vocab_matches(tokenizer, model.tok_embeddings.num_embeddings)


def _build_loss(cfg: DictConfig):
    """The config's `loss` (LanguageModelLoss when unset): loss(model, batch) -> (sum of losses, units)."""
    from ftcore.runner.loss import LanguageModelLoss

    return instantiate(cfg.loss) if cfg.get("loss") is not None else LanguageModelLoss()


def _on_device(loss, device: torch.device) -> Callable:
    def loss_fn(model, batch):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        return loss(model, batch)

    return loss_fn


def _check_items_fit_loss(dataset, node, loss, key: str) -> None:
    """A preference loss (DPO) trains on (chosen, rejected) pairs; the other losses on token sequences."""
    pairs = getattr(loss, "pairs", False)
    wanted = "chosen_tokens" if pairs else "tokens"
    if not len(dataset) or wanted in dataset[0]:
        return
    fix = (
        "use a preference dataset (ftcore.data.preference_dataset) with this loss"
        if pairs
        else "preference pairs train with the lora_dpo recipe and its loss, ftcore.runner.dpo.DPOLoss"
    )
    raise ValueError(
        f"config key `{key}`: {node.get('_component_')} gives items with {sorted(dataset[0])}, not the "
        f"`{wanted}` that the loss {type(loss).__name__} trains on; {fix}"
    )
