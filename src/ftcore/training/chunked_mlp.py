"""Sequence-chunked MLP: every FeedForward runs its tokens in chunks, each under its own checkpoint.

At long context the widest activations of a block are the SwiGLU MLP's: w1 x, w3 x, silu(w1 x) and
their product are each (B*T, hidden_dim), hidden_dim = 14336 for Llama-3.1-8B, 3.5x the model width.
Even with per-block checkpointing, the block's recompute holds all of them at once for its backward.
The MLP acts on each token independently, so it can run on chunks of tokens; with each chunk under a
non-reentrant checkpoint only the chunk's input is kept, and in the backward the chunks are recomputed
one at a time, so only one chunk's hidden_dim-wide intermediates are alive at once. Nested inside the
block's checkpoint (or offloaded checkpoint) this holds during the block's recompute too. The cost is
one more MLP forward per step (less its down projection's GEMMs, whose output the recompute discards:
ftcore.modules.recompute). Without grad (evaluation, prefill) the chunks run without checkpoints.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ftcore.modules.recompute import marked_recompute_contexts


def chunked_mlp_forward(
    mlp_forward, chunk_tokens: int, x: torch.Tensor, preserve_rng_state: bool = True, eager: bool = False
) -> torch.Tensor:
    """`mlp_forward(x)` for x (..., dim), computed `chunk_tokens` flattened tokens at a time. `eager`:
    the chunks' checkpoints mark their recomputes (a context torch.compile cannot trace)."""
    flat = x.reshape(-1, x.shape[-1])  # (N, dim), N = B*T
    if flat.shape[0] <= chunk_tokens:
        return mlp_forward(x)
    pieces = flat.split(chunk_tokens)  # views of (<= chunk_tokens, dim)
    if torch.is_grad_enabled():
        marking: dict[str, Any] = {"context_fn": marked_recompute_contexts} if eager else {}
        outputs = [
            checkpoint(
                mlp_forward, piece, use_reentrant=False, preserve_rng_state=preserve_rng_state, **marking
            )
            for piece in pieces
        ]
    else:
        outputs = [mlp_forward(piece) for piece in pieces]
    return torch.cat(outputs).view(*x.shape[:-1], -1)  # (N, dim_out) -> (..., dim_out)


def check_chunk_tokens(chunk_tokens) -> None:
    """The `mlp_chunk_tokens` value: an integer >= 1 (None, no chunking, is the caller's to skip)."""
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(
            f"config key `mlp_chunk_tokens` must be an integer >= 1 (or null for no chunking), got {chunk_tokens!r}"
        )


def apply_mlp_chunking(model: nn.Module, chunk_tokens: int, eager: bool = True) -> None:
    """Make every FeedForward of `model` process its input `chunk_tokens` tokens at a time.

    Each module's own `forward` is replaced in place, so names and state dicts are unchanged. `eager`:
    the chunks' recomputes leave out the down projection's GEMMs (False when compiling)."""
    from ftcore.distributed.parallelize import draws_random_numbers, skip_closing_outputs_in_recompute
    from ftcore.models.transformer import FeedForward

    check_chunk_tokens(chunk_tokens)
    if eager:  # a chunk's output is its down projection's, which the chunk's recompute discards
        skip_closing_outputs_in_recompute(model)
    for module in model.modules():
        if isinstance(module, FeedForward):
            # monkey-patching the instance's forward
            module.forward = functools.partial(  # type: ignore[method-assign]
                chunked_mlp_forward,
                module.forward,
                chunk_tokens,
                preserve_rng_state=draws_random_numbers(module),
                eager=eager,
            )
