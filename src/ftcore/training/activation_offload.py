"""Activation offloading: per-block activation checkpointing whose saved block input lives in host memory.

Plain per-block checkpointing keeps one tensor per block on the GPU, the block's input (B, T, dim), from
which the backward recomputes the block. At long context that is what grows: for Llama-3.1-8B, 32 blocks
x T x 4096 x 2 bytes = 8 GiB per 32K tokens. With offloading, each block input is copied to pinned host
memory on a side CUDA stream during the forward and the GPU copy is freed; in the backward it is copied
back (the block backpropagated next, the previous layer, is prefetched on the side stream while the
current one computes), the block is recomputed with grad enabled and backpropagated.

How: the block still runs inside `torch.utils.checkpoint` (non-reentrant), so the RNG replay (dropout),
autocast, gradients to the block's parameters and the early-stopped recompute are torch's own. Only the
input is hidden from it: checkpoint keeps its tensor arguments alive until the backward, so the input is
handed over inside a `HostInput` (a non-tensor argument, which checkpoint keeps as it is) that gives the
live tensor to the forward, drops it when the forward returns, and gives the recompute a copy restored
from the host. The autograd graph of the forward still links the block's output to its input, so the
input gradient flows as usual. The host copy lives as long as checkpoint's record of the block, which
autograd frees after the block's backward (unless the graph is retained).

Streams: the side stream waits for the compute stream before each copy (the input must be written, a
restore target's memory may just have been freed by queued work), `record_stream` keeps the allocator
from reusing a tensor's memory before the side-stream copy has read or written it, and the compute
stream waits for a restore's event before the recompute reads it. Pinned host buffers are safe to free
early: the caching host allocator waits for the copies queued on them. On a CPU device the offload is
an ordinary copy, so the same code path runs in the CPU tests.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from typing import cast

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ftcore.modules.recompute import marked_recompute_contexts


class SideStream:
    """The side CUDA stream one model's host copies run on (made on first use, on the tensors' GPU)."""

    def __init__(self) -> None:
        self._stream: torch.cuda.Stream | None = None

    def stream(self, device: torch.device) -> torch.cuda.Stream | None:
        if device.type != "cuda":
            return None
        if self._stream is None or self._stream.device != device:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream


class OffloadChain(SideStream):
    """The blocks of one model in forward order: the newest host input, for the next block to link to."""

    def __init__(self) -> None:
        super().__init__()
        self.newest: weakref.ref | None = None


class HostInput:
    """One block's input across its checkpoint: the live tensor during the forward, a host copy after."""

    def __init__(self, x: torch.Tensor, previous: weakref.ref | None, stream: torch.cuda.Stream | None):
        self.live: torch.Tensor | None = x
        self.device, self.shape, self.dtype, self.requires_grad = x.device, x.shape, x.dtype, x.requires_grad
        self.previous = previous  # the block before this one (weak: it must not outlive its own graph)
        self.stream = stream
        self.host = copy_to_host(x, stream)
        self.prefetched: tuple[torch.Tensor, torch.cuda.Event | None] | None = None

    def get(self) -> torch.Tensor:
        """The block input: the live tensor in the forward; restored from the host in a recompute."""
        if self.live is not None:
            return self.live
        restored, ready = self.prefetched or _copy_to_device(self)
        self.prefetched = None
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)
        previous = self.previous() if self.previous is not None else None
        if previous is not None:  # the previous layer is backpropagated next: bring its input now
            previous.prefetch()
        # the recompute must save the same tensors as the forward did: requires_grad as the original's
        return restored.detach().requires_grad_(self.requires_grad)

    def prefetch(self) -> None:
        if self.live is None and self.prefetched is None:
            self.prefetched = _copy_to_device(self)


# Host pieces: torch's pinned-memory allocator rounds every allocation up to a power of two (2.6 GiB,
# one Llama-3.1-8B block input at 342K tokens, would pin 4 GiB; 32 of them, 128 GiB). A copy is
# therefore split into power-of-two pieces of at most MAX bytes, the last (< MIN bytes) rounded up.
MAX_PIECE_BYTES = 1 << 28  # 256 MiB: few copies per block, little to round
MIN_PIECE_BYTES = 1 << 20


def piece_numels(numel: int, element_size: int) -> list[int]:
    """Element counts of the host pieces of a `numel`-element tensor: power-of-two byte sizes, largest first."""
    sizes, left = [], numel * element_size
    while left > 0:
        size = min(MAX_PIECE_BYTES, 1 << (left.bit_length() - 1))  # the largest power of two <= left
        size = left if size < MIN_PIECE_BYTES else size  # the remainder whole (a multiple of element_size)
        sizes.append(size // element_size)
        left -= size
    return sizes


def _on(stream: torch.cuda.Stream | None):
    return contextlib.nullcontext() if stream is None else torch.cuda.stream(stream)


def copy_to_host(
    x: torch.Tensor, stream: torch.cuda.Stream | None, record: bool = True
) -> list[torch.Tensor]:
    """x as host pieces (pinned, copied on `stream`, on CUDA; ordinary copies on CPU). `record=False`: the
    caller keeps x (contiguous) alive until the copies are done, instead of `record_stream`, which holds the
    memory back from reuse while `memory_allocated` no longer counts it."""
    flat = x.detach().reshape(-1)  # (numel,): a view, or a compute-stream copy if x is not contiguous
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(x.device))  # x is written by queued compute work
    pieces, start = [], 0
    with _on(stream):
        for numel in piece_numels(flat.numel(), flat.element_size()):
            piece = torch.empty(numel, dtype=x.dtype, pin_memory=stream is not None)
            pieces.append(piece.copy_(flat[start : start + numel], non_blocking=True))
            start += numel
    if stream is not None and record:  # the memory is not reused until these copies have read it
        x.record_stream(stream)
        flat.record_stream(stream)
    return pieces


def copy_from_host(
    targets: list[torch.Tensor],
    hosts: list[list[torch.Tensor]],
    device: torch.device,
    stream: torch.cuda.Stream | None,
    record: bool = True,
) -> torch.cuda.Event | None:
    """Fill each contiguous target (allocated from the compute stream's pool) from its host pieces, in
    order, on `stream` when there is one; return the event the compute stream must wait for before
    reading them (None without a side stream). `record=False`: the caller makes the compute stream wait
    for that event before any target can be freed, instead of `record_stream`."""
    if stream is not None:  # the targets' memory may still be read by queued compute work
        stream.wait_stream(torch.cuda.current_stream(device))
    with _on(stream):
        for target, pieces in zip(targets, hosts, strict=True):
            flat, start = target.view(-1), 0  # (numel,)
            for piece in pieces:
                flat[start : start + piece.numel()].copy_(piece, non_blocking=True)
                start += piece.numel()
            if (
                stream is not None and record
            ):  # a prefetch freed unused must not be reused before its copy is done
                target.record_stream(stream)
    return stream.record_event() if stream is not None else None


def _copy_to_device(saved: HostInput) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """(the input rebuilt on its device from the host pieces, the event the compute stream must wait
    for, or None without a side stream)."""
    target = torch.empty(saved.shape, dtype=saved.dtype, device=saved.device)  # the compute stream's pool
    return target, copy_from_host([target], [saved.host], saved.device, saved.stream)


def _run_block(block_forward, saved: HostInput, device_anchor, *args, **kwargs):
    return block_forward(saved.get(), *args, **kwargs)


def offloaded_checkpoint(block_forward, chain: OffloadChain, index: int, x: torch.Tensor, *args, **kwargs):
    """`torch.utils.checkpoint(block_forward, x, *args)` with the saved `x` kept in host memory."""
    if not torch.is_grad_enabled():  # evaluation, generation: nothing is saved, the block just runs
        return block_forward(x, *args, **kwargs)
    previous = chain.newest if index > 0 else None
    saved = HostInput(x, previous, chain.stream(x.device))
    chain.newest = weakref.ref(saved)
    # checkpoint stashes the RNG state of the devices its tensor arguments are on: x is hidden, so an
    # empty tensor on x's device stands in for it (the dropout of a recompute replays the forward's)
    device_anchor = x.new_empty(0)
    try:
        return checkpoint(
            _run_block,
            block_forward,
            saved,
            device_anchor,
            *args,
            use_reentrant=False,
            context_fn=marked_recompute_contexts,  # this checkpoint is eager, also around a compiled block
            **kwargs,
        )
    finally:
        saved.live = None  # the forward is done with it; the caller's reference is the last GPU one


def apply_activation_offloading(model: nn.Module) -> None:
    """Checkpoint every block of `model.layers` with its input offloaded to host memory.

    The block's own `forward` is wrapped in place (as `apply_activation_checkpointing` does), so
    parameter and state-dict names are unchanged."""
    from ftcore.distributed.parallelize import skip_closing_outputs_in_recompute

    skip_closing_outputs_in_recompute(model)
    chain = OffloadChain()
    for index, block in enumerate(cast(nn.ModuleList, model.layers)):
        # monkey-patching the instance's forward
        block.forward = functools.partial(offloaded_checkpoint, block.forward, chain, index)  # type: ignore[method-assign]
