"""The process group of a torchrun job: start it from torchrun's environment, end it cleanly, and make a
failing or hung rank end the whole job with its rank and reason instead of a silent hang.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every process it starts.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger("ftcore")

# Long enough for rank 0 to write a large checkpoint while the others wait at a barrier, short enough
# that a dead peer ends the job within minutes rather than the 30-minute NCCL default.
DEFAULT_TIMEOUT_S = 600.0
_TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when torchrun (or any launcher setting the same variables) started this process."""
    return all(name in os.environ for name in _TORCHRUN_VARS)


def _read_rank_vars() -> tuple[int, int, int]:
    values = {}
    for name in _TORCHRUN_VARS:
        text = os.environ.get(name, "")
        if not text.isdigit():
            raise ValueError(
                f"environment variable {name}={text!r} is not a non-negative integer; start multi-process "
                "runs with `ftcore run --nproc_per_node N ...` (torchrun), which sets it"
            )
        values[name] = int(text)
    rank, local_rank, world_size = values["RANK"], values["LOCAL_RANK"], values["WORLD_SIZE"]
    if world_size < 1 or rank >= world_size:
        raise ValueError(f"RANK={rank} must be below WORLD_SIZE={world_size}; check the launcher's flags")
    return rank, local_rank, world_size


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistributedEnv:
    """Join torchrun's process group (idempotent). Backend: nccl when CUDA is visible, else gloo.

    Under NCCL each rank takes the GPU of its LOCAL_RANK. `timeout_s` bounds every collective: a rank
    whose peer died or hangs raises (gloo) or is torn down by NCCL's watchdog (async error handling)
    after that long, its process exits non-zero, and torchrun stops the other ranks.
    """
    rank, local_rank, world_size = _read_rank_vars()
    use_cuda = torch.cuda.is_available() if backend is None else backend == "nccl"
    backend = backend or ("nccl" if use_cuda else "gloo")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                "lower --nproc_per_node to the number of GPUs on this node"
            )
        torch.cuda.set_device(local_rank)
        # 1 = on a failed or timed-out collective, abort the communicator and end this process.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            timeout=timedelta(seconds=timeout_s),
            device_id=device if use_cuda else None,
        )
    log.info(
        "rank %d/%d (local %d) on %s joined the %s process group",
        rank,
        world_size,
        local_rank,
        device,
        backend,
    )
    return DistributedEnv(rank, local_rank, world_size, device)


def destroy_distributed() -> None:
    """Leave the process group cleanly: wait for every rank, then tear it down.

    Exiting with a live gloo group can abort the interpreter at shutdown; the barrier also keeps a fast
    rank from closing the group while a slow one still writes its part of a checkpoint.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """End a torchrun rank at once, after its process group is destroyed and its output flushed.

    A 2-process gloo run was seen to abort at interpreter shutdown ("terminate called without an
    active exception", SIGABRT) after finishing its work, intermittently, even after a clean
    `destroy_process_group()`; torchrun then reports the whole job as failed. `os._exit` skips the
    C++ static destructors where that happens. Only for ranks started by torchrun.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def rank_label() -> str:
    """`rank R/W on HOST` for messages; `single process` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return f"rank {dist.get_rank()}/{dist.get_world_size()} on {socket.gethostname()}"
    if launched_by_torchrun():
        return f"rank {os.environ['RANK']}/{os.environ['WORLD_SIZE']} on {socket.gethostname()}"
    return "single process"


def report_rank_failure(fn):
    """Decorate a rank's entry point: an exception is printed with the rank that raised it, then re-raised.

    torchrun only says "exitcode 1" for a child that died; this line (on stderr, which torchrun shows)
    names the rank and the reason, and the re-raise keeps the exit code non-zero so torchrun stops the
    other ranks instead of letting them wait at their next collective until the timeout.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BaseException as error:
            if not isinstance(error, (KeyboardInterrupt, SystemExit)):
                detail = "".join(traceback.format_exception_only(type(error), error)).strip()
                print(f"ftcore: {rank_label()} failed: {detail}", file=sys.stderr, flush=True)
            raise

    return wrapper
