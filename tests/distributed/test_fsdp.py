"""FSDP2 over 2 CPU processes (gloo, started by torchrun) against the plain single-process run.

The reference is the unsharded model trained in this process on the same global batch; FSDP must
reproduce its losses, its weights (gathered to rank 0), and resume exactly from a DCP training state
written on another world size. Each launch takes ~10 s on 2 cores.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ftcore.models.transformer import init_weights
from tests.distributed import fsdp_worker

WORKER = Path(fsdp_worker.__file__)
TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args: str, nproc: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={_free_port()}", str(WORKER), *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def single_process(*args: str) -> dict:
    out = Path(args[args.index("--out") + 1])
    fsdp_worker.main(list(args))
    return torch.load(out)


def _checked(result: subprocess.CompletedProcess, out: Path) -> dict:
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out)


@pytest.fixture(scope="module", params=["full", "lora"])
def weights(request, tmp_path_factory) -> tuple[str, str]:
    """A starting checkpoint (base + adapters with a non-zero B, so both adapter factors train at once)."""
    torch.manual_seed(1)
    model = fsdp_worker.build_model(request.param)
    init_weights(model)
    state = {
        k: (torch.randn_like(v) * 0.02 if "lora_b" in k else v).contiguous()
        for k, v in model.state_dict().items()
    }
    path = tmp_path_factory.mktemp(request.param) / "start.safetensors"
    save_file(state, str(path))
    return request.param, str(path)


def assert_same_weights(reference: dict, other: dict) -> None:
    assert reference.keys() == other.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(other[name], tensor, atol=TOL, rtol=0, msg=name)


def test_two_ranks_match_one_process(weights, tmp_path):
    kind, path = weights
    common = ["--kind", kind, "--weights", path, "--steps", "3"]
    reference = single_process(*common, "--out", str(tmp_path / "one.pt"))
    sharded = _checked(torchrun(*common, "--out", str(tmp_path / "two.pt")), tmp_path / "two.pt")
    assert sharded["world_size"] == 2 and len(sharded["losses"]) == 3
    assert sharded["losses"] == pytest.approx(reference["losses"], abs=TOL)
    assert reference["losses"][0] != reference["losses"][-1]  # it trained
    assert_same_weights(reference["weights"], sharded["weights"])  # the gathered full state dict


def test_two_ranks_with_offloaded_blocks_match_one_process(weights, tmp_path):
    """ac_offload_blocks under FSDP2: each rank copies what its unchecked blocks save (the all-gathered
    weights excepted, which stay with FSDP) and trains as the plain single process does."""
    kind, path = weights
    common = ["--kind", kind, "--weights", path, "--steps", "3"]
    reference = single_process(*common, "--out", str(tmp_path / "one.pt"))
    run = torchrun(*common, "--offload_blocks", "2", "--out", str(tmp_path / "two.pt"))
    sharded = _checked(run, tmp_path / "two.pt")
    assert sharded["offloaded"] > 0
    assert sharded["losses"] == pytest.approx(reference["losses"], abs=TOL)
    assert_same_weights(reference["weights"], sharded["weights"])


@pytest.mark.parametrize("save_ranks,resume_ranks", [(2, 1), (1, 2)])
def test_resume_on_another_world_size(weights, tmp_path, save_ranks, resume_ranks):
    kind, path = weights
    common = ["--kind", kind, "--weights", path, "--steps", "2"]
    uninterrupted = single_process(
        "--kind", kind, "--weights", path, "--steps", "4", "--out", str(tmp_path / "ref.pt")
    )

    state = tmp_path / "state"
    first = [*common, "--save_state", str(state), "--out", str(tmp_path / "a.pt")]
    if save_ranks == 1:
        single_process(*first)
    else:
        _checked(torchrun(*first), tmp_path / "a.pt")
    second = [*common, "--resume", str(state), "--out", str(tmp_path / "b.pt")]
    resumed = single_process(*second) if resume_ranks == 1 else _checked(torchrun(*second), tmp_path / "b.pt")

    assert resumed["losses"] == pytest.approx(uninterrupted["losses"][2:], abs=TOL)
    assert_same_weights(uninterrupted["weights"], resumed["weights"])
