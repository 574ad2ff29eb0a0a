"""load_config + apply_overrides: the torchtune override syntax, typed by YAML rules."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from ftcore import paths
from ftcore.config import ConfigError, apply_overrides, load_config
from ftcore.config.loading import parse_value


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("3", 3),
        ("-2", -2),
        ("1e-4", 1e-4),  # PyYAML alone reads this as a string; OmegaConf's loader reads a float
        ("2.5", 2.5),
        ("true", True),
        ("False", False),
        ("null", None),
        ("None", None),
        ("[a,b]", ["a", "b"]),
        ("[1, 2.0]", [1, 2.0]),
        ("'3'", "3"),
        ("hello", "hello"),
        ("", ""),
        ("${dim}", "${dim}"),
    ],
)
def test_values_are_typed_by_yaml_rules(raw, expected):
    value = parse_value(raw)
    assert value == expected and type(value) is type(expected)


def test_overrides_set_add_delete_and_swap_component(fixtures_dir):
    cfg = load_config(fixtures_dir / "tiny.yaml")
    out = apply_overrides(
        cfg,
        [
            "model.hidden_dim=32",
            "model=ftcore_test_components.make_vocab",
            "augment.1.factor=3",
            "~loss",
            "+model.activation=gelu",
            "+extra.deep.key=[1,2]",
            "optimizer.lr=1e-3",
        ],
    )
    assert out.model._component_ == "ftcore_test_components.make_vocab"
    assert out.model.hidden_dim == 32 and out.model.activation == "gelu" and out.model.in_dim == 8
    assert out.augment[1].factor == 3 and "loss" not in out
    assert out.extra.deep.key == [1, 2] and out.optimizer.lr == pytest.approx(1e-3)
    assert cfg.model.hidden_dim == 16 and "loss" in cfg, "the input config is not modified"


def test_replacing_a_component_node_with_a_mapping(fixtures_dir):
    out = apply_overrides(load_config(fixtures_dir / "tiny.yaml"), ["loss={_component_: torch.nn.L1Loss}"])
    assert OmegaConf.to_container(out.loss) == {"_component_": "torch.nn.L1Loss"}


def test_builtin_name_resolves_under_configs_dir(tmp_path, monkeypatch):
    (tmp_path / "llama3_1").mkdir()
    (tmp_path / "llama3_1" / "8B_lora.yaml").write_text("batch_size: 2\n")
    monkeypatch.setattr(paths, "CONFIGS_DIR", tmp_path)
    assert load_config("llama3_1/8B_lora").batch_size == 2
    assert load_config("llama3_1/8B_lora.yaml").batch_size == 2
    with pytest.raises(ConfigError, match=r"Did you mean `llama3_1/8B_lora`\?"):
        load_config("llama3_1/8B_lroa")


def test_interpolations_follow_overrides(fixtures_dir):
    out = apply_overrides(load_config(fixtures_dir / "tiny.yaml"), ["dim=4"])
    assert out.model.in_dim == 4 and out.model.norm.normalized_shape == 4
