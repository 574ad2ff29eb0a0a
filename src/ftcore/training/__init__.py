"""The shared pieces every recipe calls; each is tested on its own (tests/training/)."""

from ftcore.training.accumulation import AccumulatedStep, accumulate_gradients, count_trained_tokens
from ftcore.training.checkpoint_io import (
    atomic_torch_save,
    atomic_write_dir,
    atomic_write_file,
    atomic_write_json,
    find_latest_checkpoint,
    keep_last_n,
    list_checkpoints,
)
from ftcore.training.early_stopping import EarlyStopping
from ftcore.training.guards import NonFiniteLossError, check_finite, explain_oom, oom_message
from ftcore.training.loggers import (
    JSONLLogger,
    MultiLogger,
    StdoutLogger,
    TensorBoardLogger,
    WandBLogger,
    build_metric_logger,
)
from ftcore.training.optim import adamw, adamw_8bit, clip_grad_norm_, cpu_offload_adamw, sgd
from ftcore.training.optim_in_backward import OptimizerInBackward
from ftcore.training.peft_export import save_peft_adapter
from ftcore.training.plot import plot_loss_curve
from ftcore.training.progress import ProgressBar, peak_memory_gib
from ftcore.training.schedules import constant_with_warmup, cosine_with_warmup, linear_with_warmup
from ftcore.training.state import TrainingProgress, load_training_state, save_training_state

__all__ = [
    "AccumulatedStep",
    "EarlyStopping",
    "JSONLLogger",
    "MultiLogger",
    "NonFiniteLossError",
    "OptimizerInBackward",
    "ProgressBar",
    "StdoutLogger",
    "TensorBoardLogger",
    "TrainingProgress",
    "WandBLogger",
    "accumulate_gradients",
    "adamw",
    "adamw_8bit",
    "atomic_torch_save",
    "atomic_write_dir",
    "atomic_write_file",
    "atomic_write_json",
    "build_metric_logger",
    "check_finite",
    "clip_grad_norm_",
    "constant_with_warmup",
    "cosine_with_warmup",
    "count_trained_tokens",
    "cpu_offload_adamw",
    "explain_oom",
    "find_latest_checkpoint",
    "keep_last_n",
    "linear_with_warmup",
    "list_checkpoints",
    "load_training_state",
    "oom_message",
    "peak_memory_gib",
    "plot_loss_curve",
    "save_peft_adapter",
    "save_training_state",
    "sgd",
]
