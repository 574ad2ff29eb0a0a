"""A misspelt model key in a shipped config is caught for every kind of builder (size partials,
GGUF and HF-config builders), not swallowed by a **kwargs."""

from __future__ import annotations

import importlib.util

import pytest

from ftcore.config import ConfigError, apply_overrides, load_config, validate_config
from ftcore.paths import RECIPES_DIR


def _recipe_keys():
    spec = importlib.util.spec_from_file_location(
        "lora_recipe_for_validation", RECIPES_DIR / "lora_finetune.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CONFIG_KEYS, module.RUNTIME_ARGS


@pytest.mark.parametrize("config", ["llama3_2/1B_lora", "qwen2_5/7B_qlora", "stories/260K_lora"])
def test_misspelt_lora_rank_is_named(config):
    keys, runtime_args = _recipe_keys()
    cfg = apply_overrides(load_config(config), ["+model.lora_rnak=4"])
    with pytest.raises(ConfigError, match="lora_rnak.*Did you mean `lora_rank`"):
        validate_config(cfg, keys, source=config, runtime_args=runtime_args)


def test_adding_to_a_list_appends_at_the_end_only():
    cfg = apply_overrides(load_config("demo/reverse_full"), ["+evaluators.1={_component_: builtins.dict}"])
    assert len(cfg.evaluators) == 2
    with pytest.raises(ConfigError, match="the list has 1 item"):
        apply_overrides(load_config("demo/reverse_full"), ["+evaluators.3=foo"])


def test_writing_under_a_null_value_is_a_config_error():
    with pytest.raises(ConfigError, match="`early_stopping_patience` is None, not a mapping"):
        apply_overrides(load_config("demo/reverse_full"), ["+early_stopping_patience.x=1"])
