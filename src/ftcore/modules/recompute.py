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
from collections.abc import Iterator

_state = threading.local()


@contextlib.contextmanager
def recomputing() -> Iterator[None]:
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def is_recomputing() -> bool:
    return getattr(_state, "depth", 0) > 0


def marked_recompute_contexts() -> tuple[
    contextlib.AbstractContextManager, contextlib.AbstractContextManager
]:
    """A checkpoint `context_fn`: nothing around the forward, `recomputing()` around the recompute.

    Eager only: torch.compile traces only selective-checkpoint contexts (under compile the LoRA layer
    takes its plain-ops path, and Inductor's partitioner decides what is recomputed)."""
    return contextlib.nullcontext(), recomputing()
