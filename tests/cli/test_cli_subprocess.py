"""`ftcore` run as a user runs it: a fresh process, asserting on its output and exit code.

Each test pays a Python + torch start (~2-3 s), so only what needs a real process is here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
RECIPE, CONFIG = str(FIXTURES / "tiny_recipe.py"), str(FIXTURES / "tiny.yaml")


def ftcore(*args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "import sys; from ftcore.cli.main import main; sys.exit(main())", *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def test_top_level_help_lists_every_command():
    result = ftcore("--help")
    assert result.returncode == 0
    for command in ("ls", "cp", "cat", "validate", "run", "download", "data"):
        assert f"\n    {command}" in result.stdout


def test_bad_override_fails_in_one_line_before_the_recipe_is_imported():
    result = ftcore("run", RECIPE, "--config", CONFIG, "model.hiden_dim=3")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"ftcore: error: {CONFIG} override `model.hiden_dim=3`: `model.hiden_dim`: no such key in the config. "
        "Did you mean `hidden_dim` or `in_dim`? To add a new key, write `+model.hiden_dim=...`."
    ]
    assert "tiny_recipe: imported" not in result.stderr and result.stdout == ""


def test_run_in_process_calls_recipe_main(tmp_path):
    result = ftcore("run", RECIPE, "--config", CONFIG, f"output_dir={tmp_path}", "steps=2", "~augment")
    assert result.returncode == 0, result.stderr
    assert [line.split()[:4] for line in result.stdout.splitlines()] == [
        ["rank", "0", "step", "0"],
        ["rank", "0", "step", "1"],
    ]
    assert (tmp_path / "done_rank0.txt").read_text() == "2\n"


def test_run_with_torchrun_flags_runs_the_recipe_on_every_rank(tmp_path):
    result = ftcore(
        "run", "--nproc_per_node", "2", "--standalone", RECIPE, "--config", CONFIG,
        f"output_dir={tmp_path}", "steps=1", timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # all_reduce of (rank + 1) over 2 ranks: 1 + 2 = 3 on each rank
    # The two ranks share one stdout, so their lines may interleave: match the reports, not the lines.
    assert sorted(re.findall(r"rank \d/2 sum \d+", result.stdout)) == ["rank 0/2 sum 3", "rank 1/2 sum 3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done_rank0.txt", "done_rank1.txt"]
    assert "torch.distributed.run --nproc_per_node=2 --standalone -m ftcore.cli.launch" in result.stderr


def test_download_offline_ends_with_one_line_and_exit_code_1(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": "hf_dummy"}
    result = ftcore(
        "download", "meta-llama/Llama-3.2-1B-Instruct", "--output-dir", str(tmp_path / "m"), env=env
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ftcore download: error: could not download meta-llama/")
    assert "Traceback" not in result.stderr


def test_a_value_the_recipe_setup_refuses_ends_in_one_line_with_exit_2(tmp_path):
    # Passes validation (an int), refused by the training loop's setup: no traceback by default.
    args = ("run", "full_finetune", "--config", "demo/reverse_full", f"output_dir={tmp_path}", "max_steps=-5")
    result = ftcore(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == (
        "ftcore: error: config key `max_steps` must be >= 1 or null (off), got -5 "
        "(while setting up the run; FTCORE_TRACEBACK=1 shows where)"
    )
    assert "Traceback" not in result.stderr
    traced = ftcore(*args, env={"FTCORE_TRACEBACK": "1"})
    assert traced.returncode == 1 and "Traceback" in traced.stderr and "must be >= 1 or null" in traced.stderr


def test_output_into_a_closed_pipe_ends_quietly_with_141():
    """`ftcore ls | head -0`: the reader is gone before the first write; no traceback, no
    'Exception ignored' at exit, and the status a shell gives a program stopped by SIGPIPE."""
    command = [sys.executable, "-c", "import sys; from ftcore.cli.main import main; sys.exit(main())", "ls"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # long before the child has imported torch and printed anything
    stderr = process.communicate(timeout=120)[1].decode()
    assert process.returncode == 141 and stderr == "", stderr
