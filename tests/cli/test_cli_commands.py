"""The `ftcore` subcommands, called in-process through `main(argv)` (the subprocess tests are separate)."""

from __future__ import annotations

import sys
import types

import pytest

from ftcore import paths, registry
from ftcore.cli import commands
from ftcore.cli.main import main


@pytest.fixture
def fake_project(tmp_path, monkeypatch):
    """A configs/ and recipes/ tree with one recipe owning one config, plus one orphan config."""
    configs, recipes = tmp_path / "configs", tmp_path / "recipes"
    (configs / "fam").mkdir(parents=True)
    (configs / "fam" / "1B_lora.yaml").write_text("batch_size: 2\nlr: ${batch_size}\n")
    (configs / "fam" / "1B_extra.yaml").write_text("x: 1\n")
    recipes.mkdir()
    (recipes / "my_recipe.py").write_text("def recipe_main(cfg):\n    pass\n")
    fake = types.SimpleNamespace(
        name="my_recipe", aliases=("mine",), configs=("fam/1B_lora",), path=recipes / "my_recipe.py"
    )
    monkeypatch.setattr(paths, "CONFIGS_DIR", configs)
    monkeypatch.setattr(registry, "RECIPES", (fake,))
    return tmp_path


@pytest.mark.parametrize(
    "command", [[], ["ls"], ["cp"], ["cat"], ["validate"], ["run"], ["download"], ["data"]]
)
def test_help_everywhere(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: ftcore" in capsys.readouterr().out


def test_ls_lists_recipes_configs_and_aliases(fake_project, capsys):
    assert main(["ls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["RECIPE", "CONFIG"]
    assert lines[1].split() == ["my_recipe", "fam/1B_lora"]
    assert lines[2].split() == ["(no", "recipe)", "fam/1B_extra"]
    assert lines[-1].split() == ["my_recipe", "mine"]


def test_ls_shows_every_registered_recipe(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for entry in registry.RECIPES:
        assert entry.name in out
        assert all(cfg in out for cfg in entry.configs)


def test_cp_config_and_recipe_and_refuses_to_overwrite(fake_project, capsys):
    dest = fake_project / "out" / "mine"
    assert main(["cp", "fam/1B_lora", str(dest)]) == 0
    copied = dest.with_suffix(".yaml")
    assert copied.read_text() == (fake_project / "configs" / "fam" / "1B_lora.yaml").read_text()
    copied.write_text("edited\n")
    assert main(["cp", "fam/1B_lora", str(copied)]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert copied.read_text() == "edited\n"
    assert main(["cp", "fam/1B_lora", str(copied), "--force"]) == 0
    assert copied.read_text().startswith("batch_size: 2")
    assert main(["cp", "mine", str(fake_project / "out")]) == 0  # a recipe, by alias, into a folder
    assert (fake_project / "out" / "my_recipe.py").is_file()
    assert main(["cp", "fam/1B_lroa", str(fake_project / "x.yaml")]) == 2
    assert "Did you mean `fam/1B_lora`" in capsys.readouterr().err


def test_cat_applies_overrides_and_resolves_on_request(fake_project, capsys):
    assert main(["cat", "fam/1B_lora", "batch_size=8", "+extra=[1,2]"]) == 0
    assert capsys.readouterr().out == "batch_size: 8\nlr: ${batch_size}\nextra:\n- 1\n- 2\n"
    assert main(["cat", "fam/1B_lora", "--resolve", "batch_size=8"]) == 0
    assert "lr: 8" in capsys.readouterr().out
    assert main(["cat", "fam/1B_lora", "batchsize=8"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("ftcore: error: ")
        and "Did you mean `batch_size`" in err
        and len(err.splitlines()) == 1
    )


def test_validate_with_and_without_recipe(fixtures_dir, capsys):
    cfg, recipe = str(fixtures_dir / "tiny.yaml"), str(fixtures_dir / "tiny_recipe.py")
    assert main(["validate", "--config", cfg, "steps=4"]) == 0  # the override is not taken for a recipe
    assert "Config OK" in capsys.readouterr().out
    assert main(["validate", recipe, "--config", cfg, "steps=4"]) == 0
    assert "6 components; checked against recipe" in capsys.readouterr().out
    assert main(["validate", recipe, "--config", cfg, "+stesp=4"]) == 2
    assert "not a key the recipe reads. Did you mean `steps`" in capsys.readouterr().err
    assert main(["validate", "no_such_recipe", "--config", cfg]) == 2
    assert "no built-in recipe of that name" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, words",
    [
        ("ac_mode=selective", "ac_mode: selective needs enable_activation_checkpointing: true"),
        ("ac_skip_last_blocks=-3", "ac_skip_last_blocks: -3 must be an integer >= 0"),
        ("enable_activation_offloading=true", "needs enable_activation_checkpointing: true"),
    ],
)
def test_validate_checks_the_speed_switches_of_a_fine_tuning_config(override, words, capsys):
    assert main(["validate", "lora_finetune", "--config", "demo/reverse_lora", override]) == 2
    err = capsys.readouterr().err
    assert "reverse_lora.yaml" in err and words in err


@pytest.mark.parametrize(
    "override, words",
    [
        ("loss.beta=-0.1", "loss.beta must be > 0"),
        ("loss.label_smoothing=0.5", "loss.label_smoothing must be in [0, 0.5)"),
        ("loss.chunk_size=0", "loss.chunk_size must be >= 1"),
    ],
)
def test_validate_checks_the_values_of_ftcores_loss(override, words, capsys):
    assert main(["validate", "lora_dpo", "--config", "stories/260K_lora_dpo", override]) == 2
    err = capsys.readouterr().err
    assert "260K_lora_dpo.yaml: `loss`" in err and words in err


def test_unknown_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["ls", "--bogus"])
    assert exit_.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_data_check_forwards_its_arguments(monkeypatch):
    seen = []
    fake = types.ModuleType("ftcore.data.check")
    fake.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "ftcore.data.check", fake)
    monkeypatch.setattr(commands.importlib.util, "find_spec", lambda name: object())
    assert main(["data", "check", "--config", "x.yaml", "--rows", "5", "a=1"]) == 3
    assert seen == [["--config", "x.yaml", "--rows", "5", "a=1"]]


def test_data_check_missing_module_says_so(monkeypatch, capsys):
    monkeypatch.setattr(commands.importlib.util, "find_spec", lambda name: None)
    assert main(["data", "check", "x"]) == 1
    assert "ftcore.data.check is missing" in capsys.readouterr().err


def test_validate_warns_of_each_missing_input_path_once(tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text("{}\n")
    absent = tmp_path / "absent.gguf"
    overrides = [
        f"checkpoint_dir={tmp_path}",
        f"model.path={absent}",
        f"tokenizer.path={absent}",
        f"checkpointer.path={absent}",
        f"dataset.source={data}",
        "dataset_val.source=org/hub_dataset",
    ]
    assert main(["validate", "lora_finetune", "--config", "stories/260K_lora", *overrides]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"warning: tokenizer.path, model.path, checkpointer.path: {absent} does not exist on this machine; "
        "the run stops at setup unless it exists where it runs"
    ]


@pytest.mark.parametrize("override", ["model.lora_attn_modules=[q_proj,", "model={b", "optimizer.lr=${nope"])
def test_an_override_that_is_not_valid_yaml_is_one_line_naming_it(override, capsys):
    assert main(["validate", "lora_finetune", "--config", "demo/reverse_lora", override]) == 2
    err = capsys.readouterr().err
    assert f"override `{override}`" in err and "is not valid YAML" in err and "Traceback" not in err


def test_cat_resolve_of_a_broken_interpolation_is_one_line(capsys):
    assert main(["cat", "demo/reverse_lora", "--resolve", "optimizer.lr=${nope}"]) == 2
    assert "`optimizer.lr`: cannot resolve interpolation" in capsys.readouterr().err


def test_validate_does_not_warn_of_files_the_run_writes_into_its_output_dir(tmp_path, capsys):
    # the demo generates its train/val files under output_dir at setup; they are not missing inputs
    assert (
        main(["validate", "lora_finetune", "--config", "demo/reverse_lora", f"output_dir={tmp_path}/new"])
        == 0
    )
    assert "does not exist" not in capsys.readouterr().err
    absent = tmp_path / "elsewhere" / "val.jsonl"
    assert (
        main(["validate", "lora_finetune", "--config", "demo/reverse_lora", f"evaluators.0.path={absent}"])
        == 0
    )
    assert f"evaluators[0].path: {absent} does not exist" in capsys.readouterr().err
