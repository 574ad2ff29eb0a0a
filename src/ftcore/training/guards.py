"""Failing well: a non-finite loss stops the run naming the step; out-of-memory errors say what to change."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; the run stops before the optimizer step spreads it into the weights."""


def check_finite(loss: torch.Tensor | float, step: int) -> None:
    value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"loss is {value} at step {step}; stopping (the last saved checkpoint is left as it was). "
            "Try a lower optimizer.lr, clip_grad_norm (e.g. 1.0; not with optimizer_in_backward or "
            "cpu_offload_adamw), a longer warmup, or dtype=fp32, and "
            "check the batch at this step for empty or corrupt examples."
        )


# Settings that reduce memory, most effective first, with what to set.
MEMORY_SETTINGS = (
    ("batch_size", "lower it (and raise gradient_accumulation_steps to keep the effective batch)"),
    ("gradient_accumulation_steps", "raise it while lowering batch_size"),
    ("enable_activation_checkpointing", "set it to True (recomputes activations in backward)"),
    ("ac_mode", "set it to full (ac_mode: selective keeps GEMM outputs or whole blocks, for speed)"),
    ("ac_skip_last_blocks", "lower it or set null (those last blocks keep all their activations)"),
    ("ac_offload_blocks", "lower it or set null (the host link may not drain those blocks' copies in time)"),
    ("enable_activation_offloading", "set it to True with checkpointing (block inputs in host memory)"),
    ("mlp_chunk_tokens", "set it, e.g. 8192, for long sequences (the MLP in checkpointed chunks)"),
    (
        "offload_embedding",
        "set it to True (LoRA/QLoRA, untied embeddings: the frozen token table in host memory, 1 GiB at 8B)",
    ),
    ("max_seq_len", "lower it (shorter sequences, or packing with a smaller max_seq_len)"),
    ("model.quantize_base", "set it to True (QLoRA: the frozen base in NF4, about 4x smaller)"),
    ("optimizer", "use ftcore.training.adamw_8bit (8-bit state) or cpu_offload_adamw (state on the CPU)"),
    ("optimizer_in_backward", "set it to True (full fine-tuning: gradients freed as they are used)"),
)


def oom_message(current: Mapping[str, Any] | None = None) -> str:
    """What to change after running out of memory, with the current values where known."""
    current = current or {}
    lines = ["out of memory. Settings that reduce memory:"]
    for key, advice in MEMORY_SETTINGS:
        now = f" (now {current[key]})" if key in current else ""
        lines.append(f"  - {key}{now}: {advice}")
    return "\n".join(lines)


@contextlib.contextmanager
def explain_oom(current: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Re-raise torch.OutOfMemoryError with oom_message() prepended (the original stays as __cause__)."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        raise torch.OutOfMemoryError(f"{oom_message(current)}\noriginal error: {error}") from error
