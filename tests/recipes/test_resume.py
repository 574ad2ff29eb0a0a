"""Exact resume: a real `ftcore run` killed with SIGKILL between steps, then resumed, ends with the
same weights, bit for bit, as a run that never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.recipes.helpers import ftcore_run_command, trained_weights

OVERRIDES = [
    "dataset.source.num_rows=512",
    "~dataset_val",
    "~evaluators",
    "batch_size=8",
    "epochs=2",
    "max_steps=60",
    "save_every_n_steps=4",
    "keep_last_n=3",
    "log_every_n_steps=1",
    "plot_loss_curve=false",
    "model.lora_dropout=0.1",
]


def _ftcore_run(output_dir: Path, *extra: str, launcher: tuple[str, ...] = ()) -> subprocess.Popen:
    command = ftcore_run_command(
        *launcher,  # torchrun flags, before the recipe
        "lora_finetune",
        "--config",
        "demo/reverse_lora",
        f"output_dir={output_dir}",
        *OVERRIDES,
        *extra,
    )
    return subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        # a shell's background job starts with SIGINT ignored, and Python then never raises Ctrl-C
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, f"run ended before {path} appeared: {process.stderr.read()}"
        assert time.time() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.02)


def test_kill_9_then_resume_gives_identical_weights(tmp_path):
    straight = _ftcore_run(tmp_path / "straight")
    assert straight.wait(timeout=300) == 0, straight.stderr.read()

    killed = _ftcore_run(tmp_path / "killed")
    _wait_for(tmp_path / "killed" / "step_000008" / "training_state.json", killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "step_000060").exists(), "the run finished before it could be killed"

    resumed = _ftcore_run(tmp_path / "killed", "resume_from_checkpoint=true")
    stderr = resumed.communicate(timeout=300)[1]
    assert resumed.returncode == 0, stderr
    assert "resumed from" in stderr

    # The steps the resumed run repeated are logged once: the loss curve does not double back.
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    ]
    loss_steps = [s for s in steps if s > 0]
    assert loss_steps == sorted(loss_steps) and len(set(loss_steps)) == len(loss_steps)

    expected = trained_weights(tmp_path / "straight" / "step_000060")
    actual = trained_weights(tmp_path / "killed" / "step_000060")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_ctrl_c_names_the_checkpoint_to_resume_from_without_a_traceback(tmp_path):
    run = _ftcore_run(tmp_path / "out", "epochs=1000", "max_steps=100000")  # still training at the signal
    _wait_for(tmp_path / "out" / "step_000004" / "training_state.json", run)
    run.send_signal(signal.SIGINT)
    stderr = run.communicate(timeout=120)[1]
    assert run.returncode == 130, stderr
    assert "interrupted at step" in stderr and "resume_from_checkpoint=true" in stderr
    assert "Traceback" not in stderr


def _processes_of(output_dir: Path) -> list[str]:
    """The processes (torchrun, ranks) whose command line names `output_dir`."""
    listing = subprocess.run(
        ["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True
    ).stdout.splitlines()
    return [line for line in listing if f"output_dir={output_dir}" in line and "ps -ww" not in line]


def _wait_until_gone(output_dir: Path, timeout: float = 60.0) -> list[str]:
    deadline = time.time() + timeout
    while (left := _processes_of(output_dir)) and time.time() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.parametrize("how", ["kill -9 torchrun", "SIGTERM to ftcore run", "kill -9 ftcore run"])
def test_a_killed_torchrun_job_takes_its_ranks_with_it(tmp_path, how):
    # Orphaned ranks used to train on and write into the output folder a resumed job would then share.
    from tests.recipes.test_distributed_recipes import _free_port

    out = tmp_path / "out"
    launcher = ("--nproc_per_node=2", f"--master_port={_free_port()}")
    job = _ftcore_run(out, "epochs=1000", "max_steps=100000", "device=cpu", launcher=launcher)
    _wait_for(out / "step_000004" / "training_state.json", job)
    if how == "kill -9 torchrun":
        torchrun = next(line for line in _processes_of(out) if "torch.distributed.run" in line)
        os.kill(int(torchrun.split()[0]), signal.SIGKILL)
        expected_status = 128 + signal.SIGKILL
    elif how == "SIGTERM to ftcore run":
        job.send_signal(signal.SIGTERM)
        expected_status = 128 + signal.SIGTERM
    else:  # torchrun is told by the kernel (its parent died), and stops the ranks
        job.send_signal(signal.SIGKILL)
        expected_status = -signal.SIGKILL  # as Popen reports a process killed by a signal
    try:
        assert _wait_until_gone(out) == []
    finally:
        for line in _processes_of(out):  # never leave a rank behind for the next test
            os.kill(int(line.split()[0]), signal.SIGKILL)
    assert job.wait(timeout=30) == expected_status
    assert "interrupted at step" in job.stderr.read()  # the ranks said which checkpoint to resume from
