"""validate_config on valid graphs, and the rules it applies (runtime args, unions, CONFIG_KEYS)."""

from __future__ import annotations

import typing
from pathlib import Path

import ftcore_test_components as fx
import pytest
import torch
from omegaconf import OmegaConf

from ftcore.cli.recipes import static_declarations, validate_for_recipe
from ftcore.config import ConfigError, load_config, validate_config
from ftcore.config.validate import _simple_types


def _tiny(fixtures_dir: Path):
    return load_config(fixtures_dir / "tiny.yaml"), static_declarations(fixtures_dir / "tiny_recipe.py")


def test_valid_config_counts_every_component_and_builds_nothing(fixtures_dir):
    cfg, decl = _tiny(fixtures_dir)
    fx.BUILD_CALLS.clear()
    # model, model.norm, optimizer, loss, augment.0, augment.1
    assert validate_config(cfg, decl.config_keys, "tiny.yaml", decl.runtime_args) == 6
    assert fx.BUILD_CALLS == []


def test_static_declarations_read_without_import(fixtures_dir):
    decl = static_declarations(fixtures_dir / "tiny_recipe.py")
    assert decl.config_keys["steps"] is int and decl.config_keys["augment"] == (list, type(None))
    assert decl.runtime_args == {"optimizer": (1,)}


def test_runtime_args_decide_missing_argument_checks(fixtures_dir):
    cfg, decl = _tiny(fixtures_dir)
    validate_config(cfg, source="tiny.yaml")  # no recipe: top-level missing args are not judged
    with pytest.raises(ConfigError, match="missing required argument of `torch.optim.SGD`") as err:
        validate_config(cfg, decl.config_keys, "tiny.yaml", runtime_args={})
    assert err.value.key == "optimizer.params"
    validate_config(cfg, decl.config_keys, "tiny.yaml", runtime_args={"optimizer": ("params",)})


def test_dynamic_declarations_check_the_graph_before_importing(tmp_path, fixtures_dir):
    recipe = tmp_path / "dyn_recipe.py"
    recipe.write_text(
        "BASE = {'model': dict}\nCONFIG_KEYS = {**BASE}\nraise RuntimeError('recipe was imported')\n"
    )
    assert static_declarations(recipe) is None
    cfg = OmegaConf.create({"model": {"_component_": "torch.nn.Linear", "in_featurs": 2, "out_features": 2}})
    with pytest.raises(ConfigError, match="Did you mean `in_features`"):
        validate_for_recipe(cfg, recipe, "cfg.yaml")
    cfg.model = {"_component_": "torch.nn.Linear", "in_features": 2, "out_features": 2}
    with pytest.raises(RuntimeError, match="recipe was imported"):
        validate_for_recipe(cfg, recipe, "cfg.yaml")


@pytest.mark.parametrize(
    ("hint", "expected"),
    [
        (int, (int,)),
        (typing.Optional[int], (int, type(None))),
        (list[str], (list,)),
        (typing.Union[float, torch.Tensor], (float, torch.Tensor)),
        (str | Path, (str, Path)),
        (typing.Optional[typing.Callable], None),
        (torch.dtype, None),
        (None, None),
    ],
)
def test_which_annotations_are_checked(hint, expected):
    assert _simple_types(hint) == expected


def test_int_is_a_float_but_bool_is_not_an_int():
    node = {"_component_": "ftcore_test_components.tiny_mlp", "in_dim": 2, "hidden_dim": 2, "out_dim": 2}
    validate_config(OmegaConf.create({"m": {**node, "dropout": 0}}))
    with pytest.raises(ConfigError, match="expected int, got bool True"):
        validate_config(OmegaConf.create({"m": {**node, "in_dim": True}}))
    validate_config(OmegaConf.create({"m": {**node, "norm": None}}))  # Optional[nn.Module] accepts null


def test_lr_string_rejected_by_torch_optimizer_union():
    cfg = OmegaConf.create({"opt": {"_component_": "torch.optim.AdamW", "lr": "abc"}})
    with pytest.raises(ConfigError, match=r"`opt.lr`: expected float or Tensor, got str 'abc'"):
        validate_config(cfg)


def test_partial_builders_and_sequence_annotations_are_checked():
    node = {"_component_": "ftcore_test_components.family_builder_small", "modules": ["q_proj"]}
    validate_config(OmegaConf.create({"m": {**node, "rank": 4}}))
    with pytest.raises(ConfigError, match="`m.rank`: expected int, got str 'eight'"):
        validate_config(OmegaConf.create({"m": {**node, "rank": "eight"}}))
    with pytest.raises(ConfigError, match="`m.modules`: expected list, got str 'q_proj'"):
        validate_config(OmegaConf.create({"m": {**node, "modules": "q_proj"}}))


@pytest.mark.parametrize("builder", ["ftcore.models.lora_from_gguf", "ftcore.models.lora_from_hf_config"])
def test_checkpoint_lora_builders_refuse_a_string_of_modules(builder):
    # Unannotated, a string passed validation and LoRA then iterated its characters.
    path_key = "path" if builder.endswith("gguf") else "checkpoint_dir"
    node = {"_component_": builder, path_key: "/unused", "lora_attn_modules": "q_proj"}
    with pytest.raises(ConfigError, match="`m.lora_attn_modules`: expected list, got str 'q_proj'"):
        validate_config(OmegaConf.create({"m": node}))


def test_lora_decoder_refuses_a_string_of_modules_at_build_time():
    from ftcore.models.builders import lora_transformer_decoder

    with pytest.raises(ValueError, match=r"a list of projection names, e.g. \[q_proj\]"):
        lora_transformer_decoder(
            "q_proj", vocab_size=32, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32, max_seq_len=8
        )
