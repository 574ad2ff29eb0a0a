"""A rank that raises ends the whole torchrun job quickly, and the message names the rank."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import save_file

from ftcore.distributed.env import init_distributed
from ftcore.models.transformer import init_weights
from tests.distributed import fsdp_worker
from tests.distributed.test_fsdp import torchrun


def test_raising_rank_ends_job_with_its_rank(tmp_path):
    model = fsdp_worker.build_model("full")
    init_weights(model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    start = time.monotonic()
    # rank 0 reaches the first step's all-reduce and would wait there; the job must end anyway (rank 0
    # may also report gloo's "connection closed by peer", a consequence, not the cause).
    result = torchrun("--weights", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "o.pt"),
                      "--fail_rank", "1", timeout=90)  # fmt: skip
    assert result.returncode != 0
    assert "ftcore: rank 1/2" in result.stderr and "injected failure on rank 1" in result.stderr
    assert time.monotonic() - start < 60
    assert not (tmp_path / "o.pt").exists()


def test_hung_rank_ends_job_by_timeout_naming_the_waiting_rank(tmp_path):
    model = fsdp_worker.build_model("full")
    init_weights(model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    start = time.monotonic()
    # rank 1 stalls; rank 0's first collective times out after 5 s, it reports itself and exits non-zero,
    # and torchrun stops the stuck rank: no silent hang.
    result = torchrun("--weights", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "o.pt"),
                      "--hang_rank", "1", "--timeout_s", "5", timeout=120)  # fmt: skip
    assert result.returncode != 0
    assert "ftcore: rank 0/2" in result.stderr
    assert time.monotonic() - start < 90
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("name,value", [("RANK", "x"), ("WORLD_SIZE", "")])
def test_bad_torchrun_environment_is_a_clear_error(monkeypatch, name, value):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        init_distributed()


def test_rank_beyond_world_size_is_rejected(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK=2 must be below WORLD_SIZE=2"):
        init_distributed()
    assert not torch.distributed.is_initialized()
