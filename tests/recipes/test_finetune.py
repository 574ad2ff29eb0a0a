"""End-to-end runs of the fine-tuning recipes on the embedded demo task, on the CPU."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ftcore.training import NonFiniteLossError
from tests.recipes.helpers import demo_config, load_recipe_module, run, trained_weights


def _logged(output_dir, key):
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [row[key] for row in rows if key in row]


def test_full_finetune_lowers_loss_and_writes_checkpoint(tmp_path, last_checkpoint):
    run("full_finetune", demo_config("demo/reverse_full", tmp_path, "plot_loss_curve=true"))
    losses = _logged(tmp_path, "loss")
    assert len(losses) == 32 and losses[-1] < 0.8 * losses[0]
    folder = last_checkpoint(tmp_path)
    assert (folder / "model" / "ftcore_model.safetensors").is_file()
    assert (tmp_path / "loss_curve.png").stat().st_size > 0
    assert _logged(tmp_path, "exact_match"), "the final evaluation ran the exact-match evaluator"


@pytest.mark.parametrize("quantize_base", [False, True], ids=["lora", "qlora"])
def test_lora_recipe_trains_adapters_only_and_exports_peft(tmp_path, last_checkpoint, quantize_base):
    # NF4 blocks are 64 weights along the input dimension, so the MLP width is a multiple of 64.
    cfg = demo_config(
        "demo/reverse_lora",
        tmp_path,
        f"model.quantize_base={str(quantize_base).lower()}",
        "model.hidden_dim=384",
    )
    run("lora_finetune", cfg)
    losses = _logged(tmp_path, "loss")
    assert losses[-1] < losses[0]
    folder = last_checkpoint(tmp_path)
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 32
    saved = trained_weights(folder)
    assert saved and all("lora_" in name or "magnitude" in name for name in saved)


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    # SGD: Adam would divide tiny float differences in near-zero gradients by their own size.
    common = [
        "shuffle=false",
        "max_steps=3",
        "dataset.source.num_rows=64",
        "~lr_scheduler",
        "~evaluators",
        "optimizer=torch.optim.SGD",
        "optimizer.lr=0.5",
    ]
    run("full_finetune", demo_config("demo/reverse_full", tmp_path / "big", "batch_size=8", *common))
    run(
        "full_finetune",
        demo_config(
            "demo/reverse_full", tmp_path / "acc", "batch_size=4", "gradient_accumulation_steps=2", *common
        ),
    )
    big = trained_weights(tmp_path / "big" / "step_000003")
    accumulated = trained_weights(tmp_path / "acc" / "step_000003")
    assert big.keys() == accumulated.keys()
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], atol=2e-6, rtol=1e-5, msg=name)


def test_early_stopping_keeps_best_checkpoint(tmp_path):
    # With lr=0 the validation loss never improves after the first evaluation.
    cfg = demo_config(
        "demo/reverse_full",
        tmp_path,
        "optimizer.lr=0.0",
        "~lr_scheduler",
        "eval_every_n_steps=1",
        "early_stopping_patience=2",
        "~evaluators",
    )
    run("full_finetune", cfg)
    assert _logged(tmp_path, "early_stopped_at_step") == [3]
    assert (tmp_path / "best" / "training_state.pt").is_file()


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    module = load_recipe_module("full_finetune")
    recipe = module.FullFinetuneRecipe(
        demo_config("demo/reverse_full", tmp_path, "save_every_n_steps=2", "~evaluators")
    )
    recipe.setup()
    loop, calls = recipe.session.loop, []
    real_loss = loop.loss_fn

    def loss_turning_nan(model, batch):
        calls.append(1)
        loss, tokens = real_loss(model, batch)
        return (loss * float("nan") if len(calls) == 5 else loss), tokens

    loop.loss_fn = loss_turning_nan
    with pytest.raises(NonFiniteLossError, match="step 5"):
        recipe.train()
    assert json.loads((tmp_path / "step_000004" / "training_state.json").read_text())["step"] == 4


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path):
    module = load_recipe_module("lora_finetune")
    recipe = module.LoRAFinetuneRecipe(
        demo_config(
            "demo/reverse_lora",
            tmp_path,
            "save_every_n_steps=2",
            "max_steps=4",
            "~evaluators",
            "~lr_scheduler",
        )
    )
    recipe.setup()
    real_write = recipe.session._write_weights

    def write_then_die(folder):
        if "step_000004" in str(folder) or recipe.session.loop.progress.step == 4:
            raise KeyboardInterrupt("killed while saving")
        return real_write(folder)

    recipe.session._write_weights = write_then_die
    with pytest.raises(KeyboardInterrupt):
        recipe.train()
    assert (tmp_path / "step_000002" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "step_000004").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")], "partial save left behind"


def test_resume_past_the_middle_of_an_epoch_continues_that_epoch(tmp_path):
    # 8 batches per epoch; the checkpoint at step 6 is three quarters into the first epoch.
    common = [
        "dataset.source.num_rows=64",
        "~evaluators",
        "~dataset_val",
        "epochs=2",
        "max_steps=12",
        "save_every_n_steps=6",
        "keep_last_n=5",
        "lr_scheduler.num_warmup_steps=2",
        "model.lora_dropout=0.1",
    ]
    run("lora_finetune", demo_config("demo/reverse_lora", tmp_path / "straight", *common))
    shutil.copytree(tmp_path / "straight" / "step_000006", tmp_path / "resumed" / "step_000006")
    shutil.copytree(tmp_path / "straight" / "data", tmp_path / "resumed" / "data")
    run(
        "lora_finetune",
        demo_config("demo/reverse_lora", tmp_path / "resumed", *common, "resume_from_checkpoint=true"),
    )
    assert _logged(tmp_path / "resumed", "epoch")[:3] == [0, 0, 1]  # steps 7 and 8 finish epoch 0
    expected = trained_weights(tmp_path / "straight" / "step_000012")
    actual = trained_weights(tmp_path / "resumed" / "step_000012")
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


@pytest.mark.parametrize(
    "override", ["max_steps=0", "gradient_accumulation_steps=0", "save_every_n_steps=-1", "batch_size=0"]
)
def test_schedule_keys_are_checked_before_anything_is_built(tmp_path, override):
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=f"config key `{key}` must be >= 1"):
        run("full_finetune", demo_config("demo/reverse_full", tmp_path, override))
    assert not (tmp_path / "data").exists(), "the dataset was generated before the bad key was reported"


def test_a_fresh_run_into_a_used_output_dir_warns(tmp_path, caplog):
    cfg = demo_config(
        "demo/reverse_full", tmp_path, "max_steps=2", "~dataset_val", "~evaluators", "~lr_scheduler"
    )
    run("full_finetune", cfg)
    assert "already holds a run" not in caplog.text
    run("full_finetune", cfg)
    assert "already holds a run (latest checkpoint step_000002)" in caplog.text
    assert "resume_from_checkpoint=true" in caplog.text


def test_early_stopping_without_a_validation_set_is_refused(tmp_path):
    cfg = demo_config("demo/reverse_full", tmp_path, "~dataset_val", "early_stopping_patience=2")
    with pytest.raises(ValueError, match="`early_stopping_patience` needs a `dataset_val`"):
        run("full_finetune", cfg)


def test_a_longer_resumed_run_trains_on_at_its_own_schedules_lr(tmp_path, caplog):
    # The finished 4-step cosine leaves lr 0 in the optimizer state; step 5 of the 6-step run must not use it.
    common = ["~dataset_val", "~evaluators", "lr_scheduler.num_warmup_steps=0", "save_every_n_steps=2"]
    run("full_finetune", demo_config("demo/reverse_full", tmp_path, "max_steps=4", *common))
    run(
        "full_finetune",
        demo_config("demo/reverse_full", tmp_path, "max_steps=6", "resume_from_checkpoint=true", *common),
    )
    lrs = dict(zip(_logged(tmp_path, "step"), _logged(tmp_path, "lr"), strict=True))
    assert lrs[4] > 0 and lrs[5] > 0 and lrs[6] > 0
    assert "with a different lr or schedule" in caplog.text


def test_resuming_with_another_lora_rank_is_refused_naming_the_tensor(tmp_path):
    common = ["~dataset_val", "~evaluators", "save_every_n_steps=2", "max_steps=2"]
    run("lora_finetune", demo_config("demo/reverse_lora", tmp_path, *common))
    resumed = demo_config(
        "demo/reverse_lora",
        tmp_path,
        *common,
        "max_steps=4",
        "model.lora_rank=4",
        "resume_from_checkpoint=true",
    )
    with pytest.raises(ValueError, match=r"lora_a.weight was saved with shape \(16, .*model.lora_rank"):
        run("lora_finetune", resumed)


def test_a_configured_logger_of_metrics_jsonl_does_not_double_its_lines(tmp_path):
    logger = "metric_logger={_component_: ftcore.training.JSONLLogger, path: '${output_dir}/metrics.jsonl'}"
    cfg = demo_config("demo/reverse_lora", tmp_path, "~dataset_val", "~evaluators", "max_steps=3", logger)
    run("lora_finetune", cfg)
    assert _logged(tmp_path, "step") == [1, 2, 3]
