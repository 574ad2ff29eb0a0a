"""Whether a checkpoint is recomputing, so the one layer whose output the recompute never reads can skip it.

A non-reentrant checkpoint (torch.utils.checkpoint) reruns a block's forward in the backward only to
rebuild the tensors autograd saved, and throws the rerun's output away. A transformer block's last
projection (the MLP's down projection) feeds nothing but the residual add that makes that output, so
in the rerun its product is never read; only what it saves for its own backward is (its input and the
adapter's small product). torch ends a rerun once the last saved tensor is rebuilt, which already skips
a plain linear's GEMM (an ATen op saves its inputs before it runs) but not that of a custom autograd
function such as LoRA's one-node matmul (saved after its forward returns). That function asks
`is_recomputing()` and leaves the GEMMs out: for an 8B LoRA block, 27% of the recompute's GEMM work.

The flag is per thread: CUDA backward passes run on autograd's device threads, and the recompute
enters and leaves it on the thread that runs it. It counts, for checkpoints nested in a recompute.
"""

from __future__ import annotations

import contextlib
import threading

_state = threading.local()


class Recomputing(contextlib.AbstractContextManager):
    """Marks the running thread as recomputing while entered; re-enterable, as a checkpoint enters the
    same object again for each recompute (one per backward over a retained graph)."""

    def __enter__(self) -> None:
        _state.depth = getattr(_state, "depth", 0) + 1

    def __exit__(self, *exc_info) -> None:
        _state.depth -= 1


def is_recomputing() -> bool:
    return getattr(_state, "depth", 0) > 0


def marked_recompute_contexts() -> tuple[contextlib.AbstractContextManager, Recomputing]:
    """A checkpoint `context_fn`: nothing around the forward, `Recomputing()` around the recompute.

    Eager only: torch.compile traces only selective-checkpoint contexts (under compile the LoRA layer
    takes its plain-ops path, and Inductor's partitioner decides what is recomputed); do not pass any
    `context_fn` there, not even torch's no-op one, which Dynamo refuses as well."""
    return contextlib.nullcontext(), Recomputing()
