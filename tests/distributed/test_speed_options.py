"""speed_options(cfg): the speed/memory keys read in one place and checked before anything is built."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from ftcore.distributed.parallelize import speed_options


def test_defaults_are_all_off():
    assert speed_options(OmegaConf.create({})) == {
        "activation_checkpointing": False,
        "compile": False,
        "fused_kernels": False,
        "activation_offloading": False,
        "mlp_chunk_tokens": None,
        "ac_mode": None,
        "ac_option": None,
        "ac_skip_last_blocks": None,
        "ac_offload_blocks": None,
        "offload_embedding": False,
    }


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"mlp_chunk_tokens": 0}, "`mlp_chunk_tokens` must be an integer >= 1"),
        ({"mlp_chunk_tokens": True}, "`mlp_chunk_tokens` must be an integer >= 1"),
        ({"enable_activation_offloading": True}, "needs enable_activation_checkpointing: true"),
        (
            {"ac_mode": "selective", "ac_option": "op"},
            "ac_mode: selective needs enable_activation_checkpointing",
        ),
    ],
)
def test_bad_values_are_refused_by_key(keys, message):
    with pytest.raises(ValueError, match=message):
        speed_options(OmegaConf.create(keys))


def test_a_bad_value_stops_the_run_before_the_data_or_model_is_built(tmp_path):
    from ftcore.config import load_config
    from ftcore.runner.parts import build_parts

    cfg = load_config("demo/reverse_lora")
    cfg.output_dir, cfg.mlp_chunk_tokens = str(tmp_path), 0
    cfg.dataset = {"_component_": "a.module.that.does.not.exist"}  # would fail if it were built first
    with pytest.raises(ValueError, match="mlp_chunk_tokens"):
        build_parts(cfg, select_trainable=lambda model: list(model.parameters()))


def test_offload_embedding_is_refused_when_the_run_trains_the_embedding(tmp_path):
    from ftcore.config import load_config
    from ftcore.runner.parts import build_parts

    cfg = load_config("demo/reverse_full")
    cfg.output_dir, cfg.model.tie_embeddings, cfg.offload_embedding = str(tmp_path), False, True
    with pytest.raises(ValueError, match="needs a frozen token embedding"):
        build_parts(cfg, select_trainable=lambda model: list(model.parameters()))


@pytest.mark.parametrize(
    "model, tied",
    [
        ({"_component_": "ftcore.models.lora_llama3_2_1b"}, True),  # the builder's default ties
        ({"_component_": "ftcore.models.lora_llama3_2_1b", "tie_embeddings": False}, False),
        ({"_component_": "ftcore.models.lora_llama3_1_8b"}, False),
        ({"_component_": "ftcore.models.lora_tiny_llama", "tie_embeddings": True}, True),
    ],
)
def test_offload_embedding_of_a_tied_model_is_refused_from_the_config_alone(model, tied):
    # before the weights load (and by `ftcore validate`): the node's key, else its builder's default
    cfg = OmegaConf.create({"offload_embedding": True, "model": model})
    if tied:
        with pytest.raises(ValueError, match="ties its output projection.*offload_embedding: false"):
            speed_options(cfg)
    else:
        assert speed_options(cfg)["offload_embedding"] is True
