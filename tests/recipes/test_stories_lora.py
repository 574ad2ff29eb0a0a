"""The real fine-tune: LoRA on the pretrained stories260K (GGUF) over text it never saw, through
`ftcore run` as a user runs it. The reference points are the base model itself (its held-out loss
before training) and HF transformers (which must load the merged export and agree on its logits)."""

from __future__ import annotations

import json
import os
import subprocess

import torch

from ftcore.config import apply_overrides, load_config
from ftcore.paths import PROJECT_ROOT
from tests.recipes.helpers import ftcore_run_command

SMALL = [
    "max_steps=30",
    "eval_every_n_steps=null",
    "log_every_n_steps=10",
    "val_max_batches=4",
    "plot_loss_curve=false",
]


def _run(output_dir, *overrides):
    command = ftcore_run_command(
        "lora_finetune",
        "--config",
        "stories/260K_lora",
        f"output_dir={output_dir}",
        *SMALL,
        *overrides,
    )
    done = subprocess.run(
        command,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["val_loss"] for row in rows if "val_loss" in row]


def test_lora_on_stories260k_lowers_held_out_loss_and_merged_export_loads_in_transformers(
    assets, gsm8k_questions, tmp_path
):
    # lr=0 keeps B = 0, so this measures the pretrained model itself on the held-out split.
    base_val_loss = _run(
        tmp_path / "base", "max_steps=1", "optimizer.lr=0.0", "~lr_scheduler", "save_merged_model=false"
    )[-1]
    tuned_val_loss = _run(tmp_path / "tuned")[-1]
    assert tuned_val_loss < base_val_loss - 0.3, (base_val_loss, tuned_val_loss)

    from transformers import AutoModelForCausalLM

    from ftcore.models import HFCheckpointer, from_hf_config, init_weights

    merged = tmp_path / "tuned" / "merged_model"
    reference = AutoModelForCausalLM.from_pretrained(merged, torch_dtype=torch.float32).eval()
    ours = from_hf_config(str(merged))
    init_weights(ours)
    HFCheckpointer(str(merged)).load_into(ours)
    tokens = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(tokens).logits
        actual = ours.eval()(tokens)
    assert (expected - actual).abs().max() < 1e-4
    _merged_tokenizer_loads_in_transformers(merged, assets, gsm8k_questions)
    _generate_config_reads_the_export_as_transformers_does(merged, reference)


def _generate_config_reads_the_export_as_transformers_does(merged, reference):
    """`ftcore run generate --config generate/stories260K_merged` on the export: the greedy continuation
    equals transformers' own greedy `generate` on the same folder."""
    from tests.recipes.helpers import load_recipe_module

    cfg = apply_overrides(
        load_config("generate/stories260K_merged"), [f"checkpoint_dir={merged}", "max_new_tokens=30"]
    )
    recipe = load_recipe_module("generate").GenerateRecipe(cfg)
    recipe.setup()
    prompt = recipe.prompt_tokens()
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False)
    assert recipe.generate() == recipe.tokenizer.decode(theirs[0].tolist())


def _merged_tokenizer_loads_in_transformers(merged, assets, gsm8k_questions):
    """The GGUF vocabulary is saved as tokenizer.model; transformers must tokenize real text as ftcore
    does. (Not leading double spaces: transformers' SentencePiece conversion differs from sentencepiece
    there, for Meta's Llama 2 tokenizer.model too.)"""
    from transformers import AutoTokenizer

    from ftcore.data.tokenizers.gguf import gguf_tokenizer

    theirs = AutoTokenizer.from_pretrained(merged)
    ours = gguf_tokenizer(str(assets / "models" / "stories260K.gguf"))
    for question in gsm8k_questions[:200]:
        assert theirs(question)["input_ids"] == ours.encode(question, add_eos=False), question


def test_qlora_on_stories260k_lowers_held_out_loss(assets, tmp_path):
    # stories260K's MLP rows (hidden 172) are no multiple of NF4's 64-weight block: w2 keeps a float base.
    qlora = ["model.quantize_base=true", "save_merged_model=false"]
    base_val_loss = _run(tmp_path / "base", "max_steps=1", "optimizer.lr=0.0", "~lr_scheduler", *qlora)[-1]
    tuned_val_loss = _run(tmp_path / "tuned", *qlora)[-1]
    assert tuned_val_loss < base_val_loss - 0.3, (base_val_loss, tuned_val_loss)
