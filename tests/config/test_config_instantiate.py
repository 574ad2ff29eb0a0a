"""instantiate: nested components, lists, positional args, caller kwargs win, interpolations."""

from __future__ import annotations

import ftcore_test_components as fx
import pytest
import torch
from omegaconf import OmegaConf

from ftcore.config import ConfigError, instantiate, load_config


def test_builds_nested_components_and_lists(fixtures_dir):
    cfg = load_config(fixtures_dir / "tiny.yaml")
    model = instantiate(cfg.model)
    assert isinstance(model, torch.nn.Sequential)
    assert model[0].in_features == 8 and model[0].out_features == 16  # ${dim} resolved
    assert isinstance(model[-1], torch.nn.LayerNorm) and model[-1].normalized_shape == (8,)
    scales = [instantiate(node) for node in cfg.augment]
    assert [s.factor for s in scales] == [2.0, 0.5]


def test_positional_args_come_first_and_kwargs_win():
    node = OmegaConf.create({"_component_": "ftcore_test_components.Pair", "second": 2, "tag": "cfg"})
    pair = instantiate(node, "pos", tag="caller")
    assert (pair.first, pair.second, pair.extra) == ("pos", 2, {"tag": "caller"})


def test_caller_kwarg_replaces_a_nested_component_without_building_it():
    fx.BUILD_CALLS.clear()
    node = {
        "_component_": "ftcore_test_components.Pair",
        "first": {"_component_": "ftcore_test_components.Scale", "factor": 1.0},
    }
    pair = instantiate(node, first="given")
    assert pair.first == "given" and fx.BUILD_CALLS == []


def test_plain_mappings_and_lists_inside_arguments():
    node = {
        "_component_": "ftcore_test_components.Pair",
        "first": {"a": 1, "b": [{"_component_": "ftcore_test_components.Scale", "factor": 3.0}]},
    }
    pair = instantiate(node)
    assert (
        pair.first["a"] == 1 and isinstance(pair.first["b"][0], fx.Scale) and pair.first["b"][0].factor == 3.0
    )


def test_optimizer_gets_params_positionally(fixtures_dir):
    cfg = load_config(fixtures_dir / "tiny.yaml")
    model = torch.nn.Linear(2, 2)
    optimizer = instantiate(cfg.optimizer, model.parameters())
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == 0.1


def test_none_and_non_component_nodes():
    assert instantiate(None) is None
    with pytest.raises(ConfigError, match="expected a mapping with `_component_`"):
        instantiate(OmegaConf.create({"lr": 1}))
