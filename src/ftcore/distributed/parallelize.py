"""Apply activation checkpointing, compile and FSDP2 to a decoder from outside the model.

One linear function, each step documented, in the order that composes: checkpoint each block, then
compile each block, then shard each block and the root (FSDP2 wraps the compiled, checkpointed
blocks, as torchtitan's `parallelize_llama` orders them). Model files import no torch.distributed.
"""

from __future__ import annotations

import functools
import inspect
from typing import cast

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ftcore.config.instantiate import COMPONENT_KEY, locate
from ftcore.models.transformer import TransformerBlock
from ftcore.modules.lora import LoRALinear
from ftcore.training.selective_checkpoint import CheckpointPlan, checkpoint_plan

FULL_CHECKPOINTING = CheckpointPlan()


def draws_random_numbers(module: nn.Module) -> bool:
    """Whether `module`'s forward consumes the RNG (a dropout with p > 0). Only then must a checkpoint
    stash the RNG state for its recompute; skipping it saves host work and is what lets a CUDA graph
    capture the checkpoint on any torch version."""
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules())


def skip_closing_outputs_in_recompute(model: nn.Module) -> None:
    """Let each block's closing LoRA projection leave its GEMMs out of a checkpoint's recompute, which
    discards its output (ftcore.modules.recompute); a plain linear's GEMM torch already skips there."""
    for block in cast(nn.ModuleList, model.layers):
        projection = block.closing_projection() if isinstance(block, TransformerBlock) else None
        if isinstance(projection, LoRALinear):
            projection.skip_output_in_recompute = True


def apply_activation_checkpointing(
    model: nn.Module, plan: CheckpointPlan = FULL_CHECKPOINTING, eager: bool = True
) -> None:
    """Recompute each transformer block's activations in the backward pass instead of storing them.

    `plan` (from `checkpoint_plan`, ftcore.training.selective_checkpoint) may keep more: the GEMM and
    attention outputs (the op policy), or whole blocks unchecked. The block's own `forward` is wrapped
    in place (not the module), so parameter and state-dict names stay those of the plain model and
    checkpoints need no renaming. `eager=False` (the blocks are compiled next) leaves out the context
    that marks a recompute, which torch.compile cannot trace.
    """
    plan.check_model(model)
    skip_closing_outputs_in_recompute(model)
    blocks = cast(nn.ModuleList, model.layers)
    for index in plan.blocks(len(blocks)):
        block = blocks[index]
        block.forward = functools.partial(
            checkpoint,
            block.forward,
            use_reentrant=False,
            preserve_rng_state=draws_random_numbers(block),
            **plan.checkpoint_kwargs(eager),
        )


def apply_compile(model: nn.Module) -> None:
    """Compile block by block: one small graph reused N times compiles far faster than the whole model.

    The block's `forward` (already wrapped in a checkpoint when activation checkpointing is on) is
    compiled in place, so names keep no `_orig_mod.` prefix. `Module.compile()` is not used: it was
    seen to leave a block whose `forward` had been replaced uncompiled, without a warning.
    """
    for block in cast(nn.ModuleList, model.layers):
        block.forward = torch.compile(block.forward)


def _check_offloading(activation_checkpointing: bool) -> None:
    """Offloading moves the block inputs that activation checkpointing saves: it needs checkpointing."""
    if not activation_checkpointing:
        raise ValueError(
            "enable_activation_offloading: true needs enable_activation_checkpointing: true (offloading "
            "keeps the checkpointed block inputs in host memory); set both, or turn offloading off"
        )


def _check_offload_blocks_compile(offload_blocks: int | None, compile: bool) -> None:
    """The host copies run from saved-tensor hooks around an eager block, which torch.compile does not trace."""
    if offload_blocks and compile:
        raise ValueError(
            "ac_offload_blocks cannot be combined with compile: true (the offloaded blocks copy what autograd "
            "saves from eager hooks); set compile: false (fused_kernels still applies) or ac_offload_blocks: null"
        )


def _ties_embeddings(model_node) -> bool:
    """Whether the config's model ties its output projection to the token table: the node's
    `tie_embeddings`, else its builder's default (False where neither says, as for a missing builder)."""
    if "tie_embeddings" in model_node:
        return bool(model_node["tie_embeddings"])
    component = model_node.get(COMPONENT_KEY)
    if not isinstance(component, str):
        return False
    try:
        parameter = inspect.signature(locate(component)).parameters.get("tie_embeddings")
    except (TypeError, ValueError):  # not a callable, or no such component: the config check reports it
        return False
    return parameter is not None and parameter.default is True


def speed_options(cfg) -> dict:
    """The config keys that choose how a model runs (not what it computes), as `parallelize` keywords.

    One place for the recipes and the sharded build to read them, so a new switch is one line here.
    The values are checked here, so that `build_parts` can reject a bad one before anything is built."""
    options = {
        "activation_checkpointing": cfg.get("enable_activation_checkpointing", False),
        "compile": cfg.get("compile", False),
        "fused_kernels": cfg.get("fused_kernels", False),
        "activation_offloading": cfg.get("enable_activation_offloading", False),
        "mlp_chunk_tokens": cfg.get("mlp_chunk_tokens", None),
        "ac_mode": cfg.get("ac_mode", None),
        "ac_option": cfg.get("ac_option", None),
        "ac_skip_last_blocks": cfg.get("ac_skip_last_blocks", None),
        "ac_offload_blocks": cfg.get("ac_offload_blocks", None),
        "offload_embedding": cfg.get("offload_embedding", False),
    }
    model_node = cfg.get("model") or {}
    checkpoint_plan(  # before the weights load; parallelize checks the built model too
        options["activation_checkpointing"],
        options["ac_mode"],
        options["ac_option"],
        options["activation_offloading"],
        options["mlp_chunk_tokens"],
        options["ac_skip_last_blocks"],
        use_dora=bool(model_node.get("use_dora", False)),
        offload_blocks=options["ac_offload_blocks"],
    )
    _check_offload_blocks_compile(options["ac_offload_blocks"], options["compile"])
    if options["activation_offloading"]:
        _check_offloading(options["activation_checkpointing"])
    if options["offload_embedding"] and _ties_embeddings(model_node):
        from ftcore.modules.host_embedding import TIED_REFUSAL

        raise ValueError(TIED_REFUSAL)
    if options["mlp_chunk_tokens"] is not None:
        from ftcore.training.chunked_mlp import check_chunk_tokens

        check_chunk_tokens(options["mlp_chunk_tokens"])
    return options


def parallelize(
    model: nn.Module,
    *,
    activation_checkpointing: bool = False,
    compile: bool = False,
    fused_kernels: bool = False,
    activation_offloading: bool = False,
    mlp_chunk_tokens: int | None = None,
    ac_mode: str | None = None,
    ac_option: str | int | None = None,
    ac_skip_last_blocks: int | None = None,
    ac_offload_blocks: int | None = None,
    offload_embedding: bool = False,
    fsdp_mesh=None,
    reshard_after_forward: bool = True,
    param_dtype=None,
    reduce_dtype=None,
    cpu_offload: bool = False,
) -> nn.Module:
    """Fuse, checkpoint, compile, then (when `fsdp_mesh` is given) shard every block and the root with FSDP2.

    `offload_embedding` first moves the frozen token embedding into pinned host memory
    (ftcore.modules.host_embedding), where FSDP2 leaves it unsharded.
    `fused_kernels` first swaps in the Triton RMSNorm / SwiGLU / RoPE forwards (ftcore.modules.fused), so
    that checkpointing recomputes and compile traces the fused ops. `mlp_chunk_tokens` runs every MLP in
    checkpointed chunks of tokens (ftcore.training.chunked_mlp); `activation_offloading` checkpoints each
    block with its saved input in host memory (ftcore.training.activation_offload), wrapped around the
    compiled block when compiling. `ac_mode` / `ac_option` / `ac_skip_last_blocks` choose what
    checkpointing keeps (ftcore.training.selective_checkpoint); `ac_offload_blocks` runs that many of the
    checkpointed blocks unchecked with their saved activations in host memory
    (ftcore.training.unchecked_offload)."""
    plan = checkpoint_plan(
        activation_checkpointing,
        ac_mode,
        ac_option,
        activation_offloading,
        mlp_chunk_tokens,
        ac_skip_last_blocks,
        offload_blocks=ac_offload_blocks,
    )
    _check_offload_blocks_compile(ac_offload_blocks, compile)
    if activation_offloading:
        _check_offloading(activation_checkpointing)
    if offload_embedding:
        from ftcore.modules.host_embedding import offload_token_embedding

        offload_token_embedding(model)
    if fused_kernels:
        from ftcore.modules.fused import apply_fused_kernels

        apply_fused_kernels(model)
    if mlp_chunk_tokens is not None:  # inside each block: nested in its checkpoint, traced by compile
        from ftcore.training.chunked_mlp import apply_mlp_chunking

        apply_mlp_chunking(model, mlp_chunk_tokens, eager=not compile)
    if plan is not None and not activation_offloading:  # offloading checkpoints every block its own way
        apply_activation_checkpointing(model, plan, eager=not compile)
    if plan is not None and plan.offload:
        from ftcore.training.unchecked_offload import apply_unchecked_offloading

        apply_unchecked_offloading(model, plan.offloaded(len(cast(nn.ModuleList, model.layers))))
    if compile:
        apply_compile(model)
    if activation_offloading:  # after compile: the compiled graph is the block, the host copies stay eager
        from ftcore.training.activation_offload import apply_activation_offloading

        apply_activation_offloading(model)
    if fsdp_mesh is not None:
        from ftcore.distributed.fsdp import shard_model

        shard_model(
            model,
            fsdp_mesh,
            reshard_after_forward=reshard_after_forward,
            param_dtype=param_dtype,
            reduce_dtype=reduce_dtype,
            cpu_offload=cpu_offload,
        )
    return model
