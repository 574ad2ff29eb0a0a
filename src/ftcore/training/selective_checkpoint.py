"""Selective activation checkpointing: which blocks, or which ops inside each block, are recomputed.

Full checkpointing (`enable_activation_checkpointing: true`) keeps only each block's input and reruns
the whole block in the backward, matmuls included: about a third of a LoRA step's GEMM time. The
selective modes (`ac_mode: selective`) trade memory back for that time:

- `ac_option: op` checkpoints every block but keeps the outputs of its GEMMs and of fused attention,
  so the backward reruns only the cheap ops (norms, RoPE, SwiGLU, residual adds, dequantize). An 8B
  block at 4,096 tokens then keeps ~0.4 GB instead of 32 MB.
- `ac_option: K` (an int) checkpoints every K-th block fully and leaves the others unchecked (K = 1 is
  full checkpointing; torchtune's `ac_option` has the same meaning).

`ac_skip_last_blocks: N` (any mode) leaves the last N blocks unchecked; see `checkpointed_blocks`.

The op policy is torch's selective checkpoint (`create_selective_checkpoint_contexts`) with one rule
added for in-place ops: LoRA adds its adapter product into the base GEMM's output in place
(`addmm_`). That output is kept, so the in-place add is kept too, never replayed onto the kept tensor
(which would add the adapter twice); an in-place op on a recomputed tensor is recomputed.
"""

from __future__ import annotations

from typing import TypeGuard

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

AC_MODES = ("full", "selective")
OP_OPTION = "op"

# The expensive ops whose outputs the `op` policy keeps: GEMMs (F.linear lowers to mm, or addmm with
# a bias), the fused attention kernels, and ftcore's NF4 linear operator (dequantize + GEMM in one op).
# The unfused (math) attention is not listed: it would keep (T, T) scores; it is recomputed instead.
SAVED_OP_NAMES = frozenset(
    {
        "aten::mm",
        "aten::addmm",
        "aten::_scaled_mm",
        "aten::_scaled_dot_product_flash_attention",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_efficient_attention",
        "aten::_scaled_dot_product_cudnn_attention",
        "aten::_flash_attention_forward",
        "aten::_efficient_attention_forward",
        "ftcore::nf4_linear",
    }
)


class SaveMatmulsPolicy:
    """One checkpointed call's policy: keep the listed ops' outputs and in-place updates of them.

    Whether an in-place op mutates a kept output is read from the forward's own store of kept outputs
    (`kept`, set by `save_matmuls_context`), not from the op's output: torch versions differ in whether
    the policy runs before or after the op. The in-place decisions are replayed in order during the
    recompute, for the torch versions that consult the policy again then."""

    def __init__(self) -> None:
        self.kept: object = {}  # the caching mode's storage of kept outputs
        self._inplace_decisions: list[CheckpointPolicy] = []
        self._replayed = 0

    def __call__(self, ctx, func, *args, **kwargs) -> CheckpointPolicy:
        schema = getattr(func, "_schema", None)  # higher-order ops (compiled regions) have none
        if schema is not None and schema.name in SAVED_OP_NAMES:
            return CheckpointPolicy.MUST_SAVE
        if not (schema is not None and schema.is_mutable and args and isinstance(args[0], torch.Tensor)):
            return CheckpointPolicy.PREFER_RECOMPUTE
        if ctx.is_recompute:
            decision = self._inplace_decisions[self._replayed]
            self._replayed += 1
            return decision
        pointer = _storage_pointer(args[0])
        kept = pointer is not None and pointer in {_storage_pointer(t) for t in _tensors_in(self.kept)}
        decision = CheckpointPolicy.MUST_SAVE if kept else CheckpointPolicy.PREFER_RECOMPUTE
        self._inplace_decisions.append(decision)
        return decision


def _tensors_in(store) -> list[torch.Tensor]:
    """The tensors of the caching mode's store: nested dicts and lists of version wrappers (`.val`)."""
    if isinstance(store, torch.Tensor):
        return [store]
    if isinstance(store, dict):
        return [t for value in store.values() for t in _tensors_in(value)]
    if isinstance(store, (list, tuple)):
        return [t for value in store for t in _tensors_in(value)]
    value = getattr(store, "val", None)
    return [value] if isinstance(value, torch.Tensor) else []


def _storage_pointer(tensor: torch.Tensor) -> int | None:
    """The address of a real tensor's memory; None for the fake and functional tensors that
    torch.compile traces with (compile functionalizes in-place ops, so the rule above is not needed)."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        return None
    return tensor.untyped_storage().data_ptr()


def save_matmuls_context():
    """`context_fn` for torch.utils.checkpoint: a fresh policy per checkpointed call.

    `allow_cache_entry_mutation`: the kept GEMM output is mutated by the in-place LoRA add, which the
    policy also keeps; the recompute then returns the final tensor for both and mutates nothing."""
    policy = SaveMatmulsPolicy()
    forward, recompute = create_selective_checkpoint_contexts(policy, allow_cache_entry_mutation=True)
    policy.kept = forward.storage
    return forward, recompute


def check_ac_settings(
    activation_checkpointing: bool,
    ac_mode: str | None,
    ac_option: str | int | None,
    activation_offloading: bool = False,
    mlp_chunk_tokens: int | None = None,
    skip_last_blocks: int | None = None,
) -> None:
    """Refuse, naming the config keys, a selective checkpointing setting that cannot run."""
    _check_skip_last_blocks(skip_last_blocks, activation_checkpointing, activation_offloading)
    mode = ac_mode or "full"
    if mode not in AC_MODES:
        raise ValueError(f"ac_mode: {ac_mode!r} is not one of {', '.join(AC_MODES)}")
    if mode == "full":
        if ac_option is not None:
            raise ValueError(
                f"ac_option: {ac_option!r} applies to ac_mode: selective only; set ac_mode: selective or remove ac_option"
            )
        return
    if not activation_checkpointing:
        raise ValueError(
            "ac_mode: selective needs enable_activation_checkpointing: true (it chooses what that checkpointing "
            "recomputes)"
        )
    if ac_option != OP_OPTION and not (_is_int(ac_option) and ac_option >= 1):
        raise ValueError(
            f"ac_option: {ac_option!r} is not valid with ac_mode: selective; use 'op' (keep GEMM and attention "
            "outputs, recompute the rest) or an int K >= 1 (checkpoint every K-th block)"
        )
    if activation_offloading:
        raise ValueError(
            "ac_mode: selective cannot be combined with enable_activation_offloading (offloading checkpoints "
            "every block fully, with its input in host memory); turn one of them off"
        )
    if mlp_chunk_tokens is not None and ac_option == OP_OPTION:
        raise ValueError(
            "ac_option: op cannot be combined with mlp_chunk_tokens (the chunked MLP is checkpointed chunk by "
            "chunk inside the block); remove mlp_chunk_tokens or use ac_option: K"
        )


def _check_skip_last_blocks(
    skip_last_blocks, activation_checkpointing: bool, activation_offloading: bool
) -> None:
    if skip_last_blocks is None or skip_last_blocks == 0:
        return
    if not (_is_int(skip_last_blocks) and skip_last_blocks >= 0):
        raise ValueError(f"ac_skip_last_blocks: {skip_last_blocks!r} must be an integer >= 0 (or null)")
    if not activation_checkpointing:
        raise ValueError(
            "ac_skip_last_blocks needs enable_activation_checkpointing: true (it leaves the last blocks out of it)"
        )
    if activation_offloading:
        raise ValueError(
            "ac_skip_last_blocks cannot be combined with enable_activation_offloading (offloading checkpoints "
            "every block); turn one of them off"
        )


def checkpointed_blocks(
    num_blocks: int, ac_option: str | int | None, skip_last_blocks: int | None = None
) -> list[int]:
    """The indices of the blocks to checkpoint: all, or every K-th from block 0 when `ac_option` is K;
    then without the last `skip_last_blocks`, the first blocks the backward reaches (their kept
    activations are freed first)."""
    skip = skip_last_blocks or 0
    if skip > num_blocks:
        raise ValueError(f"ac_skip_last_blocks: {skip} is more than the model's {num_blocks} blocks")
    step = ac_option if _is_int(ac_option) else 1
    return list(range(0, num_blocks - skip, step))


def checkpoint_options(ac_option: str | int | None) -> dict:
    """Extra keywords for torch.utils.checkpoint.checkpoint: the op policy's context for `op`."""
    if ac_option == OP_OPTION:
        return {"context_fn": save_matmuls_context}
    return {}


def _is_int(value) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
