"""The part of a fine-tuning recipe that full and LoRA fine-tuning share: build, train, evaluate,
checkpoint, resume. A recipe supplies only what differs: which parameters train and which weights a
checkpoint folder holds.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from omegaconf import DictConfig, ListConfig
from safetensors.torch import load_file, save_file

from ftcore.config import instantiate
from ftcore.config.errors import run_setup
from ftcore.paths import shown_path
from ftcore.runner.loop import TrainLoop
from ftcore.runner.parts import build_parts
from ftcore.runner.sharded import (
    DCP_DIR,
    OptimizerStateInDCP,
    load_one_process_optimizer_state,
    shared_atomic_dir,
    unsharded_replica,
)
from ftcore.training import (
    NonFiniteLossError,
    explain_oom,
    find_latest_checkpoint,
    keep_last_n,
    load_training_state,
    plot_loss_curve,
    save_training_state,
)
from ftcore.training.checkpoint_io import STATE_FILE
from ftcore.training.loggers import drop_records_after
from ftcore.training.state import follow_this_runs_schedule

if TYPE_CHECKING:
    from ftcore.training.state import HasStateDict

log = logging.getLogger("ftcore")

OOM_REPORTED_KEYS = (  # their current values are shown beside the advice when a run runs out of memory
    "batch_size",
    "gradient_accumulation_steps",
    "enable_activation_checkpointing",
    "ac_mode",
    "ac_option",
    "ac_skip_last_blocks",
    "ac_offload_blocks",
    "enable_activation_offloading",
    "mlp_chunk_tokens",
    "offload_embedding",
    "optimizer_in_backward",
)
TRAINABLE_FILE = "trainable.safetensors"  # LoRA: the adapter tensors, exactly, for resume
WriteWeights = Callable[[Path], dict]
ReadWeights = Callable[[Path, dict], None]


def common_runtime_args() -> dict:
    """What a fine-tuning recipe passes to `instantiate` itself (an int: positional arguments; a str: a
    keyword), so that `ftcore validate` does not report those arguments as missing from the config."""
    return {
        "dataset": (1,),
        "dataset_val": (1,),
        "optimizer": (1,),
        "lr_scheduler": (1, "num_training_steps"),
    }


def common_config_keys() -> dict:
    """Top-level keys every fine-tuning config may hold, with their types (dict: a component node)."""
    optional_int, optional_float = (int, type(None)), (float, int, type(None))
    return {
        "output_dir": str,
        "checkpoint_dir": str,
        "seed": int,
        "device": str,
        "dtype": str,
        "tokenizer": dict,
        "model": dict,
        "checkpointer": (dict, type(None)),
        "dataset": dict,
        "dataset_val": (dict, type(None)),
        "batch_size": int,
        "epochs": int,
        "max_steps": optional_int,
        "gradient_accumulation_steps": int,
        "optimizer": dict,
        "lr_scheduler": (dict, type(None)),
        "clip_grad_norm": optional_float,
        "optimizer_in_backward": bool,
        "enable_activation_checkpointing": bool,
        "ac_mode": (str, type(None)),
        "ac_option": (str, int, type(None)),
        "ac_skip_last_blocks": optional_int,
        "ac_offload_blocks": optional_int,
        "enable_activation_offloading": bool,
        "mlp_chunk_tokens": optional_int,
        "offload_embedding": bool,
        "compile": bool,
        "fused_kernels": bool,
        "cuda_graphs": bool,
        "loss": (dict, type(None)),
        "log_every_n_steps": int,
        "eval_every_n_steps": optional_int,
        "save_every_n_steps": optional_int,
        "keep_last_n": optional_int,
        "early_stopping_patience": optional_int,
        "metric_logger": (dict, list, type(None)),
        "resume_from_checkpoint": (bool, str),
        "evaluators": (list, type(None)),
        "shuffle": bool,
        "val_max_batches": optional_int,
        "plot_loss_curve": bool,
        "eval_before_training": bool,
        "fsdp": (dict, type(None)),
    }


class FinetuneSession:
    def __init__(
        self, cfg: DictConfig, select_trainable, write_weights: WriteWeights, read_weights: ReadWeights
    ):
        self.cfg = cfg
        if cfg.get("early_stopping_patience") is not None and cfg.get("dataset_val") is None:
            raise ValueError(  # before the model is built: early stopping watches val_loss
                "config key `early_stopping_patience` needs a `dataset_val`: early stopping watches val_loss; "
                "add a dataset_val or set early_stopping_patience=null"
            )
        self.parts = build_parts(cfg, select_trainable)
        self._write_weights, self._read_weights = write_weights, read_weights
        self._evaluators = [instantiate(node) for node in (cfg.get("evaluators") or ListConfig([]))]
        p = self.parts
        has_eval = p.val_loader is not None or self._evaluators
        self.loop = TrainLoop(
            p.model,
            p.optimizer,
            p.scheduler,
            p.train_loader,
            p.train_sampler,
            p.loss_fn,
            p.settings,
            p.logger,
            self.save_checkpoint,
            self.evaluate if has_eval else None,
            device=p.device,
            is_main=p.is_main,
            seed=cfg.get("seed", 0),
            micro_step=p.micro_step,
            count_units=getattr(p.loss, "count_units", None),
            loss_metrics=getattr(p.loss, "pop_metrics", None),
        )
        self._last_saved_step = -1

    # ---- training -------------------------------------------------------------------------------
    def train(self) -> None:
        p = self.parts
        run_setup(self._maybe_resume)  # a checkpoint that cannot be resumed: one line, as a setup error
        if (
            self.cfg.get("eval_before_training", False)
            and self.loop.evaluate
            and self.loop.progress.step == 0
        ):
            # The starting point, for comparison; it neither saves `best` nor counts for early stopping.
            p.logger.log(self.evaluate(), step=0)
        log.info(
            "training %d steps on %s (%s), output in %s",
            self.loop.total_steps,
            p.device,
            p.dtype,
            p.output_dir,
        )
        try:  # Ctrl-C during the final evaluation or save is reported like one mid-training
            with explain_oom({k: self.cfg.get(k) for k in OOM_REPORTED_KEYS}):
                self.loop.run()
            self._finish()
        except NonFiniteLossError:
            log.error("stopped on a non-finite loss; the last good checkpoint is in %s", p.output_dir)
            raise
        except KeyboardInterrupt:  # Ctrl-C: say what is kept and how to go on
            latest = find_latest_checkpoint(p.output_dir)
            (log.error if p.is_main else log.debug)(
                "interrupted at step %d; %s", self.loop.progress.step,
                f"the last complete checkpoint is {latest}: run the same command with "
                "resume_from_checkpoint=true to continue from it" if latest else "no checkpoint was saved yet",
            )  # fmt: skip
            raise  # the CLI ends it with status 130, without the traceback

    def _finish(self) -> None:
        """The last evaluation and save, unless the loop's last step already did them; the plot."""
        p = self.parts
        if (
            self.loop.evaluate
            and not self.loop.stopped_early
            and self.loop.last_eval_step != self.loop.progress.step
        ):
            self.loop.run_evaluation()
        if self._last_saved_step != self.loop.progress.step:
            self.save_checkpoint(f"step_{self.loop.progress.step:06d}")
        if p.is_main and self.cfg.get("plot_loss_curve", True):
            plot_loss_curve(p.output_dir / "metrics.jsonl", p.output_dir / "loss_curve.png")

    @torch.no_grad()
    def evaluate(self) -> dict:
        p = self.parts
        p.model.eval()
        metrics = {}
        if p.val_loader is not None:
            limit = self.cfg.get("val_max_batches")
            total = torch.zeros(2, device=p.device)  # (sum of token losses, trained tokens)
            for index, batch in enumerate(p.val_loader):
                if limit is not None and index >= limit:
                    break
                loss_sum, tokens = p.loss_fn(p.model, batch)
                total += torch.stack([loss_sum.float(), torch.as_tensor(tokens, device=p.device).float()])
            if dist.is_initialized():
                dist.all_reduce(total)
            metrics["val_loss"] = float(total[0] / total[1].clamp(min=1))
            if hasattr(p.loss, "pop_metrics"):  # e.g. DPO's rewards over the validation pairs
                metrics.update({f"val_{name}": value for name, value in p.loss.pop_metrics().items()})
        for evaluator in self._evaluators:
            metrics.update(evaluator(p.model, p.tokenizer))
        if p.sharded:
            # no-grad forwards leave the root and last block gathered; the next training step would
            # then skip their all-gather and get wrong gradients (measured on 2 gloo ranks).
            from ftcore.distributed.fsdp import reshard_all

            reshard_all(p.model)
        p.model.train()
        return metrics

    # ---- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, tag: str) -> None:
        """Write `output_dir/tag` atomically: a kill mid-save leaves the previous checkpoint intact.

        Every rank calls this. Sharded runs write the trainable weights and optimizer state with
        `torch.distributed.checkpoint` (each rank its shards, into `distributed_state/`), which any
        number of ranks can read back; rank 0 writes the exported weights and `training_state.pt`.
        """
        p, progress = self.parts, self.loop.progress
        progress.extra = self.loop.state_dict()
        with shared_atomic_dir(p.output_dir / tag, p.sharded) as folder:
            trainable = self._write_weights(folder)  # collective when sharded; {} on ranks other than 0
            if trainable and p.is_main:
                save_file(
                    {k: v.detach().contiguous().cpu() for k, v in trainable.items()},
                    str(folder / TRAINABLE_FILE),
                )
            optimizer: HasStateDict = p.optimizer
            if p.sharded:
                from ftcore.distributed.state import save_training_state as save_sharded_state

                save_sharded_state(folder / DCP_DIR, p.model, p.optimizer)
                optimizer = OptimizerStateInDCP()
            if p.is_main:
                save_training_state(folder, optimizer=optimizer, scheduler=p.scheduler, progress=progress)
        if tag != "best":  # `best` is extra: the run still ends with a step/epoch checkpoint to resume from
            self._last_saved_step = progress.step
        if self.cfg.get("keep_last_n") and p.is_main:
            keep_last_n(p.output_dir, self.cfg.keep_last_n)
        log.info("saved checkpoint %s at step %d", p.output_dir / tag, progress.step)

    def _maybe_resume(self) -> None:
        resume = self.cfg.get("resume_from_checkpoint", False)
        if resume is False:
            self._warn_if_output_dir_holds_a_run()
            return
        folder = find_latest_checkpoint(self.parts.output_dir) if resume is True else Path(resume)
        if folder is None:
            log.info(
                "resume_from_checkpoint is set but %s holds no checkpoint yet: starting fresh",
                self.parts.output_dir,
            )
            return
        if not folder.is_dir():
            raise ValueError(
                f"resume_from_checkpoint: {shown_path(folder)} does not exist; point it at a step_*/epoch_* "
                "folder of a training run, or set resume_from_checkpoint=true for the latest in output_dir"
            )
        if not (folder / STATE_FILE).is_file():
            raise ValueError(
                f"resume_from_checkpoint: {folder} holds no {STATE_FILE}; point it at a step_*/epoch_* folder "
                "written by a training run, or set resume_from_checkpoint=true for the latest in output_dir"
            )
        trainable = load_file(str(folder / TRAINABLE_FILE)) if (folder / TRAINABLE_FILE).is_file() else {}
        self._read_weights(folder, trainable)
        progress = self._load_optimizer_and_progress(folder)
        self.loop.load_state_dict(progress)
        self._last_saved_step = progress.step
        if self.parts.is_main:
            drop_records_after(self.parts.output_dir / "metrics.jsonl", progress.step)
        log.info("resumed from %s at step %d", folder, progress.step)

    def _warn_if_output_dir_holds_a_run(self) -> None:
        latest = find_latest_checkpoint(self.parts.output_dir)
        if latest is not None and self.parts.is_main:
            log.warning(
                "%s already holds a run (latest checkpoint %s): this fresh run appends to its metrics.jsonl "
                "and replaces its checkpoints of the same names; set resume_from_checkpoint=true to continue "
                "that run instead, or choose a new output_dir", self.parts.output_dir, latest.name,
            )  # fmt: skip

    def _load_optimizer_and_progress(self, folder: Path):
        """Optimizer, scheduler, RNG and progress from a checkpoint written by any number of ranks; the
        next lr then follows this run's schedule (the optimizer state holds the saved run's)."""
        p = self.parts
        # This run's lr, read before the checkpoint's scheduler state replaces it.
        base_lrs = list(p.scheduler.base_lrs) if p.scheduler is not None else []
        if (folder / DCP_DIR).is_dir():  # written by N ranks: DCP reshards for this run's ranks
            from ftcore.distributed.state import load_training_state as load_sharded_state

            progress = load_training_state(folder, optimizer=OptimizerStateInDCP(), scheduler=p.scheduler)
            with warnings.catch_warnings():  # DCP warns that one process without a group reads it all
                warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
                load_sharded_state(folder / DCP_DIR, p.model, p.optimizer)
        elif p.sharded:  # written by one process, resumed on N ranks
            progress = load_training_state(folder, optimizer=OptimizerStateInDCP(), scheduler=p.scheduler)
            load_one_process_optimizer_state(folder / "training_state.pt", p.optimizer)
        else:
            progress = load_training_state(folder, optimizer=p.optimizer, scheduler=p.scheduler)
        if p.scheduler is not None:
            follow_this_runs_schedule(p.scheduler, folder, base_lrs, warn=p.is_main)
        return progress

    # ---- whole-model weights (full fine-tuning, merged LoRA export) ------------------------------
    def unsharded_model(self, keys: set[str] | None = None) -> torch.nn.Module | None:
        """The model as one process holds it: the model itself in a single process; when sharded, a
        CPU replica on rank 0 holding the tensors named in `keys` (default: all), gathered from every
        rank one at a time, and None on the other ranks. Every rank must call it."""
        p = self.parts
        if not p.sharded:
            return p.model
        from ftcore.distributed.state import gather_full_state_dict

        state = gather_full_state_dict(p.model, keys=keys)
        return unsharded_replica(self.cfg.model, p.dtype, state) if p.is_main else None

    def save_model(self, folder: Path, state_dict: dict | None = None) -> None:
        """Write the whole model (every rank calls this; rank 0 writes)."""
        from ftcore.runner.weights import save_model_weights

        p = self.parts
        if state_dict is None:
            if p.sharded:
                from ftcore.distributed.state import gather_full_state_dict

                state_dict = gather_full_state_dict(p.model)
            else:
                state_dict = p.model.state_dict()
        if p.is_main:
            save_model_weights(p.checkpointer, state_dict, folder)

    def load_model(self, folder: Path) -> None:
        from ftcore.runner.weights import load_model_weights

        load_model_weights(self.parts.model, folder)

    def save_final_model(self, state_dict: dict) -> None:
        """Write `output_dir/merged_model` from rank 0's `state_dict` (every rank calls this)."""
        with shared_atomic_dir(self.parts.output_dir / "merged_model", self.parts.sharded) as folder:
            if self.parts.is_main:
                self.save_model(folder, state_dict)

    def cleanup(self) -> None:
        self.parts.logger.close()


def run_recipe(recipe) -> None:
    """What every recipe's `recipe_main` does: set up, train, and always clean up."""
    # Under torchrun every rank runs this; progress is reported once, by rank 0 (others: warnings only).
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s")
    from ftcore.distributed.env import destroy_distributed

    run_setup(recipe.setup)
    try:
        recipe.train()
    finally:
        recipe.cleanup()
    # Only after success: after a failure the other ranks may never reach the barrier inside; exiting
    # non-zero instead lets torchrun stop them.
    destroy_distributed()
