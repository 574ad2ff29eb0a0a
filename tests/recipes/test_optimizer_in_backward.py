"""`optimizer_in_backward: true` end to end on the CPU: the real recipes, against the same run with the
ordinary optimizer step (the independent reference): AdamW updates each tensor on its own, so the
weights, the logged losses, lr and grad_norm must agree; an interrupted run resumes bit for bit."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from tests.recipes.helpers import demo_config, ftcore_run_command, run, trained_weights

CONFIGS = {"full_finetune": "demo/reverse_full", "lora_finetune": "demo/reverse_lora"}
SMALL = [
    "dataset.source.num_rows=128",
    "~dataset_val",
    "~evaluators",
    "eval_before_training=false",
    "max_steps=6",
    "clip_grad_norm=null",
    "lr_scheduler.num_warmup_steps=3",  # the warmup's lr changes must reach every per-parameter optimizer
    "save_every_n_steps=3",
]


def _run(recipe: str, output_dir, *overrides: str) -> dict[int, dict]:
    run(recipe, demo_config(CONFIGS[recipe], output_dir, *SMALL, *overrides))
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: r[k] for k in ("loss", "lr", "grad_norm")} for r in rows if "loss" in r}


@pytest.mark.parametrize("recipe", list(CONFIGS))
def test_same_weights_losses_and_grad_norms_as_the_ordinary_step(tmp_path, recipe):
    expected = _run(recipe, tmp_path / "ordinary")
    actual = _run(recipe, tmp_path / "in_backward", "optimizer_in_backward=true")
    assert sorted(actual) == list(range(1, 7)) and expected[1]["lr"] == 0.0 < expected[3]["lr"]
    for step, metrics in expected.items():
        assert actual[step]["lr"] == metrics["lr"], step
        assert actual[step]["loss"] == pytest.approx(metrics["loss"], rel=1e-6, abs=1e-7), step
        assert actual[step]["grad_norm"] == pytest.approx(metrics["grad_norm"], rel=1e-5), step
    reference = trained_weights(tmp_path / "ordinary" / "step_000006")
    ours = trained_weights(tmp_path / "in_backward" / "step_000006")
    assert reference.keys() == ours.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, atol=1e-6, rtol=1e-5, msg=name)


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    on = "optimizer_in_backward=true"
    straight = _run("full_finetune", tmp_path / "straight", on)
    # The second run starts from the first one's step-3 checkpoint, optimizer and schedule included.
    source = tmp_path / "straight" / "step_000003"
    resumed = _run("full_finetune", tmp_path / "resumed", on, f"resume_from_checkpoint={source}")
    assert sorted(resumed) == [4, 5, 6]
    assert resumed == {step: straight[step] for step in (4, 5, 6)}
    expected = trained_weights(tmp_path / "straight" / "step_000006")
    actual = trained_weights(tmp_path / "resumed" / "step_000006")
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


@pytest.mark.parametrize(
    "override, key",
    [
        ("gradient_accumulation_steps=2", "gradient_accumulation_steps"),
        ("clip_grad_norm=1.0", "clip_grad_norm"),
    ],
)
def test_settings_that_need_all_gradients_are_refused_before_training(tmp_path, override, key):
    cfg = demo_config("demo/reverse_full", tmp_path, *SMALL, "optimizer_in_backward=true", override)
    with pytest.raises(ValueError, match=f"{key}=") as error:
        run("full_finetune", cfg)
    assert "optimizer_in_backward=false" in str(error.value)
    assert not (tmp_path / "metrics.jsonl").exists(), "refused before any training step"


def test_resuming_an_ordinary_checkpoint_with_the_switch_on_is_refused(tmp_path):
    _run("full_finetune", tmp_path / "ordinary")
    source = tmp_path / "ordinary" / "step_000003"
    with pytest.raises(ValueError, match="optimizer_in_backward setting it was saved with"):
        _run(
            "full_finetune",
            tmp_path / "other",
            "optimizer_in_backward=true",
            f"resume_from_checkpoint={source}",
        )


def test_two_processes_are_refused_with_the_fix(tmp_path):
    # Under torchrun (FSDP2) the switch is refused on every rank, before the model is built.
    from tests.recipes.test_distributed_recipes import SMALL as DISTRIBUTED_SMALL
    from tests.recipes.test_distributed_recipes import _free_port

    command = ftcore_run_command("--nproc_per_node", "2", "--master_port", str(_free_port()),
               "full_finetune", "--config", "demo/reverse_full", f"output_dir={tmp_path}", *DISTRIBUTED_SMALL,
               "batch_size=4", "clip_grad_norm=null", "optimizer_in_backward=true")  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    assert "optimizer_in_backward=true is not supported under torchrun" in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()
