"""Selective activation checkpointing: which blocks, or which ops inside each block, are recomputed.

Full checkpointing (`enable_activation_checkpointing: true`) keeps only each block's input and reruns
the whole block in the backward, matmuls included: about a third of a LoRA step's GEMM time. The
selective modes (`ac_mode: selective`) trade memory back for that time:

- `ac_option: op` checkpoints every block but keeps the outputs of its GEMMs and of fused attention,
  so the backward reruns only the cheap ops (norms, RoPE, SwiGLU, residual adds, dequantize). An 8B
  block at 4,096 tokens then keeps ~0.4 GB instead of 32 MB.
- `ac_option: K` (an int) checkpoints every K-th block fully (blocks 0, K, 2K, ...) and leaves the
  others unchecked (K = 1 is full checkpointing). torchtune's `ac_option: K` also keeps one block in
  K, counted from block K-1, and applies with its `enable_activation_checkpointing` off; ftcore asks
  for it on, as what `ac_mode` refines.

`ac_skip_last_blocks: N` (any mode) leaves the last N blocks unchecked; see `CheckpointPlan.blocks`.

The op policy is torch's selective checkpoint (`create_selective_checkpoint_contexts`) with one rule
added for in-place ops: LoRA adds its adapter product into the base GEMM's output in place
(`addmm_`). That output is kept, so the in-place add is kept too, never replayed onto the kept tensor
(which would add the adapter twice); an in-place op on a recomputed tensor is recomputed.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from dataclasses import dataclass
from typing import TypeGuard, cast

import torch
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from ftcore.modules.recompute import marked_recompute_contexts

AC_MODES = ("full", "selective")
OP_OPTION = "op"
OP_WITH_DORA = (
    "ac_option: op does not support DoRA (use_dora: true): it would keep every adapter's weight-sized product; "
    "use ac_mode: full, or ac_option: K / ac_skip_last_blocks"
)

# The expensive ops whose outputs the `op` policy keeps: GEMMs (F.linear lowers to mm, or addmm with
# a bias), the fused attention kernels, and ftcore's NF4 linear operator (dispatched as one op under
# compile; in eager the GEMM inside its dequantize path is what is kept, and the forced fused Triton
# NF4 GEMM, FTCORE_NF4_MATMUL=fused, is invisible to the policy and recomputed).
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

    Whether an op writes into a kept output (in place, or through `out=`) is read from the forward's
    own store of kept outputs (`watch`, called by `save_matmuls_context`), not from the op's output:
    torch versions differ in whether the policy runs before or after the op. The decisions on writing
    ops are replayed in order during the recompute, for the torch versions that consult the policy
    again then.

    Correct only while no recomputed op reads a kept output before a kept in-place op changes it: the
    recompute hands out the kept tensor in its final state. ftcore's blocks meet this (the in-place
    LoRA add comes right after its GEMM); a block that does not is refused with an error at that op,
    not trained on wrong gradients."""

    def __init__(self) -> None:
        self._kept = _KeptStorages({})
        self._write_decisions: list[CheckpointPolicy] = []
        self._replayed = 0
        self._read_by_recomputed: set[int] = set()  # kept outputs a recomputed op read

    def watch(self, store) -> None:
        """The caching mode's storage of kept outputs, read when an op writes into a tensor."""
        self._kept = _KeptStorages(store)

    def __call__(self, ctx, func, *args, **kwargs) -> CheckpointPolicy:
        kind = _op_kind(func)
        if kind is _OpKind.KEPT:
            self._kept.changed()  # its output joins the store once this call returns
            return CheckpointPolicy.MUST_SAVE
        if kind is not _OpKind.WRITES:
            if kind is _OpKind.COMPUTES and not ctx.is_recompute:
                self._note_reads_of_kept(args, kwargs)
            return CheckpointPolicy.PREFER_RECOMPUTE
        schema = func._schema
        if ctx.is_recompute:
            decision = self._write_decisions[self._replayed]
            self._replayed += 1
            return decision
        pointers = self._kept.pointers()
        written = {_storage_pointer(t) for t in _written_tensors(schema, args, kwargs)}
        writes_kept = bool(written & pointers)
        if written & self._read_by_recomputed:
            raise RuntimeError(
                f"ac_option: op cannot checkpoint this block: `{schema.name}` changes a kept GEMM or attention "
                "output in place after a recomputed op read it, so the recompute would read the changed value; "
                "write the in-place op out of place, or use ac_mode: full"
            )
        decision = CheckpointPolicy.MUST_SAVE if writes_kept else CheckpointPolicy.PREFER_RECOMPUTE
        if writes_kept:
            self._kept.changed()
        self._write_decisions.append(decision)
        return decision

    def _note_reads_of_kept(self, args, kwargs) -> None:
        """Remember the kept outputs a recomputed op computes from (views excepted: they follow the
        kept tensor's final state in the recompute as they followed it in the forward)."""
        pointers = self._kept.pointers()
        if not pointers:
            return
        for value in (*args, *kwargs.values()):  # flat: an op's tensors, or tensor lists (cat, stack)
            for tensor in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(tensor, torch.Tensor):
                    pointer = _storage_pointer(tensor)
                    if pointer in pointers:
                        self._read_by_recomputed.add(pointer)


class _OpKind(enum.Enum):
    KEPT = "a listed GEMM or attention op: its output is kept"
    WRITES = "writes into an argument (in place, out=): kept when that argument is"
    COMPUTES = "a new tensor from its inputs: recomputed"
    VIEWS = "returns an alias of an input, or has no schema (higher-order ops): recomputed"


@functools.cache
def _op_kind(func) -> _OpKind:
    """What the policy does with an op, decided once per op overload (the policy runs for every op)."""
    schema = getattr(func, "_schema", None)
    if schema is None:
        return _OpKind.VIEWS
    if schema.is_mutable:
        return _OpKind.WRITES
    if schema.name in SAVED_OP_NAMES:
        return _OpKind.KEPT
    if any(result.alias_info is not None for result in schema.returns):
        return _OpKind.VIEWS
    return _OpKind.COMPUTES


def _written_tensors(schema, args, kwargs) -> list[torch.Tensor]:
    """The tensors an op writes into: its arguments marked `(a!)` in the schema (`self` of an in-place
    op, `out=`, the lists of a foreach op)."""
    written = []
    for index, argument in enumerate(schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = args[index] if index < len(args) else kwargs.get(argument.name)
        written += [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
    return written


class _KeptStorages:
    """The memory addresses of the kept outputs, read incrementally from the caching mode's store
    (key -> {index: entry} or key -> [entry]; an entry is a tree of version wrappers with `.val`),
    and only after a kept op (`changed`): the policy runs for every op, the store grows by few."""

    def __init__(self, store) -> None:
        self._store = store
        self._read: dict[object, int] = {}  # per key, how many entries are read
        self._pointers: set[int] = set()
        self._stale = True

    def changed(self) -> None:
        self._stale = True

    def pointers(self) -> set[int]:
        if not self._stale:
            return self._pointers
        self._stale = False
        for key, entries in self._store.items():
            done = self._read.get(key, 0)
            if len(entries) == done:
                continue
            fresh = (
                entries[done:]
                if isinstance(entries, list)
                else [entries[i] for i in range(done, len(entries))]
            )
            self._read[key] = len(entries)
            for entry in fresh:
                for leaf in tree_leaves(entry):
                    value = getattr(leaf, "val", leaf)
                    pointer = _storage_pointer(value) if isinstance(value, torch.Tensor) else None
                    if pointer is not None:  # fake tensors (compile tracing) have no address
                        self._pointers.add(pointer)
        return self._pointers


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
    policy.watch(forward.storage)
    return forward, recompute


@dataclass(frozen=True)
class CheckpointPlan:
    """What activation checkpointing keeps, decided once from the config by `checkpoint_plan`."""

    every: int = 1  # checkpoint blocks 0, every, 2 * every, ... (ac_option: K)
    skip_last: int = 0  # the last blocks left unchecked (ac_skip_last_blocks)
    keep_gemms: bool = False  # the op policy (ac_option: op)
    offload: int = 0  # of the blocks to checkpoint, how many run unchecked with their activations on the host

    def blocks(self, num_blocks: int) -> list[int]:
        """The indices of the blocks to checkpoint. The last ones left out are the first the backward
        reaches, so their kept activations are freed first."""
        offloaded = set(self.offloaded(num_blocks))
        return [index for index in self._candidates(num_blocks) if index not in offloaded]

    def offloaded(self, num_blocks: int) -> list[int]:
        """The blocks that `ac_offload_blocks` runs unchecked, their activations in host memory
        (ftcore.training.unchecked_offload): spread evenly over the blocks checkpointing would rerun."""
        if not self.offload:
            return []
        from ftcore.training.unchecked_offload import offloaded_blocks

        return offloaded_blocks(self._candidates(num_blocks), self.offload)

    def _candidates(self, num_blocks: int) -> list[int]:
        if self.skip_last >= num_blocks:
            raise ValueError(
                f"ac_skip_last_blocks: {self.skip_last} leaves none of the model's {num_blocks} blocks "
                f"checkpointed; use at most {num_blocks - 1}, or set enable_activation_checkpointing: false"
            )
        return list(range(0, num_blocks - self.skip_last, self.every))

    def check_model(self, model: torch.nn.Module) -> None:
        """DoRA's forward forms each adapter's (out, in) weight product for its norm: a GEMM the op
        policy would keep (26 GiB on an 8B model with all projections adapted), though autograd needs none."""
        if self.keep_gemms and any(getattr(module, "use_dora", False) for module in model.modules()):
            raise ValueError(OP_WITH_DORA)

    def checkpoint_kwargs(self, eager: bool = True) -> dict:
        """Extra keywords for torch.utils.checkpoint.checkpoint: the op policy's context or, in eager,
        the one that tells a layer it is being recomputed (ftcore.modules.recompute)."""
        if self.keep_gemms:
            return {"context_fn": save_matmuls_context}
        return {"context_fn": marked_recompute_contexts} if eager else {}


def checkpoint_plan(
    activation_checkpointing: bool,
    ac_mode: str | None,
    ac_option: str | int | None,
    activation_offloading: bool = False,
    mlp_chunk_tokens: int | None = None,
    skip_last_blocks: int | None = None,
    use_dora: bool = False,
    offload_blocks: int | None = None,
) -> CheckpointPlan | None:
    """The config's checkpointing settings as a plan (None: no checkpointing), or a ValueError that
    names the config keys when they cannot run together."""
    plan = _plan_without_offload(
        activation_checkpointing,
        ac_mode,
        ac_option,
        activation_offloading,
        mlp_chunk_tokens,
        skip_last_blocks,
        use_dora,
    )
    _check_offload_blocks(offload_blocks, plan, activation_offloading)
    if plan is None or not offload_blocks:
        return plan
    return dataclasses.replace(plan, offload=offload_blocks)


def _check_offload_blocks(offload_blocks, plan: CheckpointPlan | None, activation_offloading: bool) -> None:
    if offload_blocks is None or offload_blocks == 0:
        return
    if not (_is_int(offload_blocks) and offload_blocks >= 0):
        raise ValueError(f"ac_offload_blocks: {offload_blocks!r} must be an integer >= 0 (or null)")
    if plan is None:
        raise ValueError(
            "ac_offload_blocks needs enable_activation_checkpointing: true (it runs some of the checkpointed "
            "blocks unchecked instead, their activations in host memory)"
        )
    if activation_offloading:
        raise ValueError(
            "ac_offload_blocks cannot be combined with enable_activation_offloading (offloading checkpoints "
            "every block, with its input in host memory); turn one of them off"
        )


def _plan_without_offload(
    activation_checkpointing: bool,
    ac_mode: str | None,
    ac_option: str | int | None,
    activation_offloading: bool,
    mlp_chunk_tokens: int | None,
    skip_last_blocks: int | None,
    use_dora: bool,
) -> CheckpointPlan | None:
    _check_skip_last_blocks(skip_last_blocks, activation_checkpointing, activation_offloading)
    skip = skip_last_blocks or 0
    mode = ac_mode or "full"
    if mode not in AC_MODES:
        raise ValueError(f"ac_mode: {ac_mode!r} is not one of {', '.join(AC_MODES)}")
    if mode == "full":
        if ac_option is not None:
            raise ValueError(
                f"ac_option: {ac_option!r} applies to ac_mode: selective only; set ac_mode: selective or remove ac_option"
            )
        return CheckpointPlan(skip_last=skip) if activation_checkpointing else None
    if not activation_checkpointing:
        raise ValueError(
            "ac_mode: selective needs enable_activation_checkpointing: true (it chooses what that checkpointing "
            "recomputes)"
        )
    if ac_option != OP_OPTION and not (_is_int(ac_option) and ac_option >= 1):
        raise ValueError(
            f"ac_option: {'null' if ac_option is None else repr(ac_option)} is not valid with ac_mode: selective; "
            "use 'op' (keep GEMM and attention outputs, recompute the rest) or an int K >= 1 (checkpoint every "
            "K-th block)"
        )
    if activation_offloading:
        raise ValueError(
            "ac_mode: selective cannot be combined with enable_activation_offloading (offloading checkpoints "
            "every block fully, with its input in host memory); turn one of them off"
        )
    if ac_option != OP_OPTION:
        return CheckpointPlan(every=cast(int, ac_option), skip_last=skip)
    if mlp_chunk_tokens is not None:
        raise ValueError(
            "ac_option: op cannot be combined with mlp_chunk_tokens (the chunked MLP is checkpointed chunk by "
            "chunk inside the block); remove mlp_chunk_tokens or use ac_option: K"
        )
    if use_dora:
        raise ValueError(OP_WITH_DORA)
    return CheckpointPlan(skip_last=skip, keep_gemms=True)


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


def _is_int(value) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
