"""`ac_offload_blocks: N`: N blocks run without checkpointing, their saved activations kept in host memory.

Full checkpointing reruns every block's forward in the backward, about a quarter of a LoRA step's GEMMs,
because keeping what autograd saves for an unchecked block costs GPU memory (~16 x tokens x dim x 2
bytes for a fused Llama block: 0.49 GiB at Llama-3.1-70B's width and 2,048 tokens). Here N of the blocks
that would be checkpointed run unchecked instead, and each activation their autograd saves is copied to
pinned host memory on a side CUDA stream as it is saved; the GPU memory is reused once the copy has read
it. When the backward reaches the block after an offloaded one, the offloaded block's activations start
coming back on the side stream, all its storages in one go. Those blocks skip their recompute, and keep
nothing on the GPU between their forward and their backward.

It pays while the host link drains the copies as fast as the forward makes them: a block's activations
grow with tokens x dim, its GEMM time with tokens x dim^2, so wide models gain most. The offloaded blocks
are spread evenly among the checkpointed ones (`offloaded_blocks`), whose forward adds no copies, so the
link has the whole forward to drain. docs/performance.md measures where the balance lies.

What is not copied: the block's parameters and buffers (the frozen and NF4 weights autograd saves),
the tensors the caller passes besides the hidden state (mask, positions: shared by every block), and
storages under `min_bytes` (a LoRA adapter's rank-wide product). Each storage is copied once, however
many ops save it or views of it (q, k and v projections all save the same normed input). A saved tensor
changed in place is refused, at the block's end when the change came inside it (its copy may already have
been read) and at its backward when it came after the block returned (the copy holds the old value; a
saved view is checked through its base, which shares its version counter and may outlive it).

On a CPU device the copies are ordinary ones, so the same code runs in the CPU tests. Eager only (not
under torch.compile or a CUDA graph: host copies and events in every step).
"""

from __future__ import annotations

import collections
import functools
import itertools
import weakref
from typing import cast

import torch
from torch import nn

from ftcore.training.activation_offload import SideStream, copy_from_host, copy_to_host

MIN_OFFLOAD_BYTES = 1 << 20  # smaller storages stay on the GPU: not worth a copy's fixed cost
# Blocks whose copies may still be running when the next offloaded block starts. The host runs ahead of
# the GPU in eager mode (up to ~1,000 queued kernels, many blocks), and memory waiting on a copy cannot be
# reused, so without a bound the host's lead would turn into GPU memory; past it, the host waits.
MAX_BLOCKS_IN_FLIGHT = 1
# An offloaded block's activations come back when the backward is this many blocks away from it (2
# measured slower at 70B, at the same peak: docs/performance.md).
PREFETCH_LEAD_BLOCKS = 1


class HostCopies(SideStream):
    """The offloaded blocks of one model: the side stream, the GPU sources of the copies still running
    (each held until its block's copies are done), and the blocks whose backward starts a prefetch.

    Holding the sources, rather than `record_stream`, keeps `memory_allocated` honest: memory a copy is
    still reading stays counted (and is not reused), so a host link that cannot keep up shows as a peak."""

    def __init__(self) -> None:
        super().__init__()
        self.in_flight: collections.deque[tuple[torch.cuda.Event, list[torch.Tensor]]] = collections.deque()
        # block index -> the offloaded block whose activations that block's backward brings back
        self.prefetch_at: dict[int, weakref.ref] = {}

    def hold(self, stream: torch.cuda.Stream, sources: list[torch.Tensor]) -> None:
        self.in_flight.append((stream.record_event(), sources))

    def bound(self) -> None:
        """Drop the sources whose copies are done; the host waits for the oldest while more than
        `MAX_BLOCKS_IN_FLIGHT` blocks' copies remain."""
        while self.in_flight and (len(self.in_flight) > MAX_BLOCKS_IN_FLIGHT or self.in_flight[0][0].query()):
            event, _ = self.in_flight.popleft()
            event.synchronize()

    def release_all(self, device: torch.device) -> None:
        """At the backward: drop every held source once the compute stream waits for its copies. Work
        that reuses the memory then runs after them in stream order, and the host does not wait."""
        while self.in_flight:
            event, _ = self.in_flight.popleft()
            torch.cuda.current_stream(device).wait_event(event)


class _Copied:
    """A saved tensor's place in its block's host copies (which storage, the view onto it), and the
    tensor itself, weakly, to catch an in-place change after the block returned."""

    __slots__ = ("block", "key", "dtype", "size", "stride", "offset", "tensor", "version", "__weakref__")

    def __init__(self, block: BlockActivations, key: int, tensor: torch.Tensor, whole_storage: bool):
        self.block, self.key, self.dtype = block, key, tensor.dtype
        self.size = tensor.shape
        # a view alone is copied contiguous: it comes back with a contiguous layout, at offset 0
        self.stride = tensor.stride() if whole_storage else _contiguous_strides(tensor.shape)
        self.offset = tensor.storage_offset() if whole_storage else 0
        # a view shares its base's version counter, and its base outlives it: a saved temporary view
        # (`b.view(-1)`) is gone after the block, while `b` may still be changed in place
        base = tensor if tensor._base is None else tensor._base
        self.tensor, self.version = weakref.ref(base), tensor._version

    def check_unchanged(self) -> None:
        tensor = self.tensor()
        if tensor is not None and tensor._version != self.version:
            raise RuntimeError(
                IN_PLACE_CHANGE.format(shape=tuple(self.size), when="after the block returned")
            )


IN_PLACE_CHANGE = (
    "ac_offload_blocks: a tensor saved for the backward, of shape {shape}, was changed in place {when}, so "
    "its copy in host memory may hold either value; set ac_offload_blocks: null or make that op out of place"
)


class BlockActivations:
    """One offloaded block's saved activations in one forward: each storage copied once to the host."""

    def __init__(
        self, block: nn.Module, shared: tuple, chain: HostCopies, device: torch.device, min_bytes: int
    ):
        self.ready: torch.cuda.Event | None = None  # set while the compute stream has not waited for them
        tensors = itertools.chain(
            block.parameters(), block.buffers(), (t for t in shared if torch.is_tensor(t))
        )
        self.kept = {t.untyped_storage().data_ptr() for t in tensors}  # (under FSDP2: gathered by now)
        self.chain, self.min_bytes = chain, min_bytes
        self.device, self.stream = device, chain.stream(device)
        self.host: list[list[torch.Tensor]] = []  # per key: the storage's bytes in host pieces
        self.handles: weakref.WeakSet[_Copied] = weakref.WeakSet()  # what autograd still holds
        self.keys: dict[tuple, int] = {}  # during the forward: storage (and view) -> key
        self.sources: list[torch.Tensor] = []  # during the forward: what the copies read
        # during the forward: each copied tensor and its version when saved
        self.versions: list[tuple[torch.Tensor, int]] = []
        self.restored: list[torch.Tensor | None] | None = None  # per key: the bytes back on the device
        self.in_backward = False

    def pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        if (
            storage.data_ptr() in self.kept
            or storage.nbytes() < self.min_bytes
            or tensor.device != self.device  # e.g. a host table's rows: already off the GPU
        ):
            return tensor
        # a small view of a large storage (a slice of a fused output) is copied alone, not the storage
        whole = storage.nbytes() <= 2 * tensor.numel() * tensor.element_size()
        view = (tensor.dtype, tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        identity = (storage.data_ptr(),) if whole else (storage.data_ptr(), *view)
        key = self.keys.get(identity)
        if key is None:
            self.chain.bound()
            key = self.keys[identity] = len(self.host)
            source = (
                _storage_bytes(tensor) if whole else tensor.detach().contiguous().view(-1).view(torch.uint8)
            )
            self.host.append(copy_to_host(source, self.stream, record=False))
            self.sources.append(source)
            self.versions.append((tensor, tensor._version))
        handle = _Copied(self, key, tensor, whole)
        self.handles.add(handle)
        return handle

    def finish_forward(self) -> None:
        """Hand the copies' sources to the chain until the copies are done (then their memory is reused),
        after checking that no copied tensor was changed in place while its copy may have been running."""
        if self.stream is not None and self.sources:
            self.chain.hold(self.stream, self.sources)
        self.chain.bound()
        changed = [tuple(t.shape) for t, version in self.versions if t._version != version]
        self.sources, self.versions, self.keys = [], [], {}
        if changed:
            raise RuntimeError(IN_PLACE_CHANGE.format(shape=changed[0], when="later in the same block"))

    def prefetch(self) -> None:
        """Bring back, on the side stream, the storages autograd still holds a saved tensor of (an op
        whose graph was dropped in the forward, as a detached result's, needs none)."""
        if self.restored is not None or not self.host:
            return
        self.chain.release_all(self.device)
        live = {handle.key for handle in list(self.handles)}
        sizes = [sum(p.numel() for p in pieces) if key in live else 0 for key, pieces in enumerate(self.host)]
        targets = [torch.empty(size, dtype=torch.uint8, device=self.device) for size in sizes]
        hosts = [pieces if key in live else [] for key, pieces in enumerate(self.host)]
        self.ready = copy_from_host(targets, hosts, self.device, self.stream, record=False)
        self.restored = [target if key in live else None for key, target in enumerate(targets)]

    def unpack(self, handle: _Copied) -> torch.Tensor:
        handle.check_unchanged()
        if not self.in_backward:  # this block's first unpack
            self.in_backward = True
            self.prefetch()  # unless a later block's backward began it (`prefetch_at_backward`)
            self._wait_for_copies()
        data = cast(list, self.restored)[handle.key]
        view = torch.empty(0, dtype=handle.dtype, device=data.device)
        return view.set_(data.untyped_storage(), handle.offset, handle.size, handle.stride)

    def _wait_for_copies(self) -> None:
        if self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)
            self.ready = None

    def __del__(self) -> None:
        # a prefetch never read (a backward that stopped early): whatever reuses its memory on the
        # compute stream must come after the copies into it
        self._wait_for_copies()


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _storage_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The whole storage under `tensor`, as a flat uint8 tensor (a view: no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(tensor.untyped_storage())


def _unpack(handle):
    return handle.block.unpack(handle) if isinstance(handle, _Copied) else handle


def offloaded_unchecked_forward(block_forward, block: nn.Module, chain: HostCopies, prefetch_at: int | None,
                                min_bytes: int, x: torch.Tensor, *args, **kwargs):  # fmt: skip
    """`block_forward(x, *args)` with what autograd saves in it kept in host memory until the backward."""
    if not torch.is_grad_enabled():  # evaluation, generation: nothing is saved
        return block_forward(x, *args, **kwargs)
    saved = BlockActivations(block, (*args, *kwargs.values()), chain, x.device, min_bytes)
    if prefetch_at is not None:  # replaces what a forward that stopped before that block left
        chain.prefetch_at[prefetch_at] = weakref.ref(saved)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, _unpack):
        out = block_forward(x, *args, **kwargs)
    saved.finish_forward()
    return out


def prefetch_at_backward(block_forward, chain: HostCopies, index: int, x: torch.Tensor, *args, **kwargs):
    """The forward of a block `PREFETCH_LEAD_BLOCKS` after an offloaded one: when the backward reaches it
    (its output's gradient is ready), the offloaded block's activations start coming back, that many
    blocks ahead of their use and no earlier, so few offloaded blocks wait on the GPU at once."""
    offloaded = chain.prefetch_at.pop(index, None)
    out = block_forward(x, *args, **kwargs)
    if out.requires_grad and offloaded is not None:
        out.register_hook(functools.partial(_prefetch, offloaded))
    return out


def _prefetch(saved: weakref.ref, grad: torch.Tensor) -> None:
    activations = saved()
    if activations is not None:
        activations.prefetch()


def offloaded_blocks(candidates: list[int], count: int) -> list[int]:
    """`count` of the `candidates` (the blocks checkpointing would rerun), spread evenly from the first:
    between two offloaded blocks the checkpointed ones give the host link time to drain the copies."""
    if count > len(candidates):
        blocks = "block" if len(candidates) == 1 else "blocks"
        raise ValueError(
            f"ac_offload_blocks: {count} is more than the {len(candidates)} {blocks} checkpointing would rerun "
            f"(ac_skip_last_blocks and ac_option: K leave others unchecked); use at most {len(candidates)}"
        )
    return [candidates[(k * len(candidates)) // count] for k in range(count)]


def apply_unchecked_offloading(model: nn.Module, indices: list[int], min_bytes: int | None = None) -> None:
    """Run the blocks of `model.layers` at `indices` unchecked, with their saved activations in host
    memory (storages of at least `min_bytes`, default `MIN_OFFLOAD_BYTES`). The block's own `forward` is
    wrapped in place, so names are unchanged."""
    min_bytes = MIN_OFFLOAD_BYTES if min_bytes is None else min_bytes
    chain = HostCopies()
    blocks = cast(nn.ModuleList, model.layers)
    # each offloaded block's prefetching block, one each; the last blocks have none after them
    prefetchers = {i: i + PREFETCH_LEAD_BLOCKS for i in indices if i + PREFETCH_LEAD_BLOCKS < len(blocks)}
    for index in indices:
        block = blocks[index]
        block.forward = functools.partial(  # type: ignore[method-assign]
            offloaded_unchecked_forward, block.forward, block, chain, prefetchers.get(index), min_bytes
        )
    for at in sorted(prefetchers.values()):  # outermost wrappers
        after = blocks[at]
        after.forward = functools.partial(prefetch_at_backward, after.forward, chain, at)  # type: ignore[method-assign]
