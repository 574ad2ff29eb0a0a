"""DPO on the pretrained stories260K over real preference pairs (LLaMA-Factory's dpo_en_demo), through
`ftcore run lora_dpo` as a user runs it. Reference points from the method itself: before training the
policy is the reference, so every pair's loss is log 2; afterwards held-out pairs must rank the chosen
answer above the rejected one more often than chance. Plus the refusals when data and loss disagree."""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest

from ftcore.config import apply_overrides, load_config
from ftcore.paths import PROJECT_ROOT
from tests.recipes.helpers import ftcore_run_command, load_recipe_module


def test_dpo_on_stories260k_ranks_held_out_chosen_answers_higher(assets, tmp_path):
    command = ftcore_run_command(
        "lora_dpo", "--config", "stories/260K_lora_dpo", f"output_dir={tmp_path}", "plot_loss_curve=false"
    )
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evaluations = [row for row in rows if "val_loss" in row]
    start, end = evaluations[0], evaluations[-1]
    assert start["step"] == 0 and start["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert end["val_loss"] < math.log(2) - 0.02, end
    assert end["val_rewards_accuracy"] > 0.6 and end["val_rewards_margin"] > 0, end
    trained = [row for row in rows if "rewards_accuracy" in row]
    assert trained[-1]["loss"] < 0.3, trained[-1]  # the training pairs themselves are fitted
    assert (tmp_path / "epoch_3" / "adapter" / "adapter_model.safetensors").is_file()  # 3 epochs: epoch_1..3


def _stories(config: str, tmp_path, *overrides: str):
    return apply_overrides(load_config(config), [f"output_dir={tmp_path}", *overrides])


PREFERENCE_DATA = [
    "dataset._component_=ftcore.data.preference_dataset",
    "dataset.source=../shared/assets/data/dpo_en_demo.json",
    "~dataset.column_map",
    "~dataset.packed",
    "~dataset_val",
]


def test_token_recipe_refuses_preference_pairs_and_names_the_dpo_recipe(assets, tmp_path):
    recipe = load_recipe_module("lora_finetune").LoRAFinetuneRecipe(
        _stories("stories/260K_lora", tmp_path, *PREFERENCE_DATA)
    )
    with pytest.raises(ValueError, match="config key `dataset`.*not the `tokens`.*lora_dpo recipe"):
        recipe.setup()


def test_dpo_recipe_refuses_token_data_and_token_losses(assets, tmp_path):
    text_data = ["dataset._component_=ftcore.data.text_completion_dataset",
                 "dataset.source=../shared/assets/data/gsm8k_test.jsonl", "+dataset.column_map={text: question}",
                 "~dataset_val"]  # fmt: skip
    recipe = load_recipe_module("lora_dpo").LoRADPORecipe(
        _stories("stories/260K_lora_dpo", tmp_path, *text_data)
    )
    with pytest.raises(ValueError, match="not the `chosen_tokens` that the loss DPOLoss.*preference_dataset"):
        recipe.setup()
    token_loss = "loss={_component_: ftcore.runner.loss.LanguageModelLoss}"
    recipe = load_recipe_module("lora_dpo").LoRADPORecipe(
        _stories("stories/260K_lora_dpo", tmp_path, token_loss)
    )
    with pytest.raises(ValueError, match="config key `loss`: lora_dpo trains on preference pairs"):
        recipe.setup()


def test_dpo_loss_matches_hf_transformers_with_peft_on_real_pairs(assets, tmp_path):
    """The reference model through peft's `disable_adapter()`, the policy through peft's LoRA, the
    log-probabilities from HF logits: the paper's loss from those equals ftcore's DPOLoss."""
    import torch
    import torch.nn.functional as F

    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from ftcore.data import preference_collate, preference_dataset
    from ftcore.data.tokenizers.gguf import gguf_tokenizer
    from ftcore.models import GGUFCheckpointer, init_weights, lora_from_gguf
    from ftcore.modules.lora import get_merged_state_dict, lora_modules
    from ftcore.runner.dpo import DPOLoss
    from ftcore.training import save_peft_adapter

    path = str(assets / "models" / "stories260K.gguf")
    model = lora_from_gguf(path, ["q_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True, lora_rank=4,
                           lora_alpha=8)  # fmt: skip
    init_weights(model)
    GGUFCheckpointer(path).load_into(model)
    GGUFCheckpointer(path).save(get_merged_state_dict(model), str(tmp_path / "base"))  # B = 0: the base
    torch.manual_seed(0)
    with torch.no_grad():
        for _, module in lora_modules(model):
            module.lora_b.weight.normal_(0, 0.05)
    save_peft_adapter(model, tmp_path / "adapter", rank=4, alpha=8)

    pairs = preference_dataset(
        gguf_tokenizer(path), str(assets / "data" / "dpo_en_demo.json"), max_seq_len=160
    )
    batch = preference_collate([pairs[i] for i in range(4)], pad_id=0)
    ours, count = DPOLoss(beta=0.2, chunk_size=100)(model.eval(), batch)

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()

    def log_probs():
        logits = theirs(input_ids=batch["tokens"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        picked = logits.log_softmax(-1).gather(2, labels.clamp(min=0)[..., None]).squeeze(-1)
        return (picked * (labels != -100)).sum(1)

    with torch.no_grad():
        policy = log_probs()
        with theirs.disable_adapter():
            reference = log_probs()
    chosen, rejected = (policy - reference).chunk(2)
    expected = -F.logsigmoid(0.2 * (chosen - rejected)).sum()
    assert int(count) == 4 and (chosen - rejected).abs().max() > 0.05  # the adapters matter
    torch.testing.assert_close(ours.detach(), expected, rtol=1e-4, atol=1e-5)


def test_dpo_on_two_processes_matches_one(assets, tmp_path):
    """FSDP2 on 2 CPU ranks (gloo) with half of each batch on each rank: the pairs' count and the rewards
    are all-reduced, and the sharded blocks are resharded after the no-grad reference forward. The
    logged losses, rewards, validation and the adapter at step 3 equal one process's."""
    from tests.recipes.helpers import run
    from tests.recipes.test_distributed_recipes import _free_port, assert_same_tensors, logged

    small = ["shuffle=false", "epochs=1", "max_steps=3", "lr_scheduler.num_warmup_steps=1", "log_every_n_steps=1",
             "eval_every_n_steps=2", "eval_before_training=false", "save_every_n_steps=3", "plot_loss_curve=false"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    run("lora_dpo", _stories("stories/260K_lora_dpo", one, *small, "batch_size=4"))
    command = ftcore_run_command("--nproc_per_node", "2", "--master_port", str(_free_port()), "lora_dpo",
                                 "--config", "stories/260K_lora_dpo", f"output_dir={two}", *small, "batch_size=2")  # fmt: skip
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    losses = logged(one, "loss")
    assert sorted(losses) == [1, 2, 3] and losses[1] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(losses[3] - math.log(2)) > 0.01  # the adapters moved (a new batch's loss may be higher)
    for key in ("loss", "rewards_margin", "rewards_accuracy", "val_loss", "val_rewards_margin"):
        assert logged(two, key) == pytest.approx(logged(one, key), abs=1e-5), key
    assert logged(two, "val_rewards_accuracy") == logged(one, "val_rewards_accuracy")
    assert logged(two, "grad_norm") == pytest.approx(logged(one, "grad_norm"), rel=1e-5)  # same adapters
    adapter = "step_000003/trainable.safetensors"
    assert_same_tensors(one / adapter, two / adapter)
