"""ftcore.training.cpu_offload_adamw off the GPU: a clear error (its CUDA tests: tests/gpu/)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")


def test_cpu_parameters_are_refused_with_the_fix():
    from ftcore.training import cpu_offload_adamw

    with pytest.raises(ValueError, match="needs the model on a CUDA GPU") as error:
        cpu_offload_adamw(nn.Linear(64, 128).parameters(), lr=1e-3)
    assert "ftcore.training.adamw" in str(error.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_recipe_on_cpu_stops_with_that_error(tmp_path):
    from tests.recipes.helpers import demo_config, run

    cfg = demo_config(
        "demo/reverse_full",
        tmp_path,
        "optimizer._component_=ftcore.training.cpu_offload_adamw",
        "~evaluators",
    )
    with pytest.raises(ValueError, match="cpu_offload_adamw needs the model on a CUDA GPU"):
        run("full_finetune", cfg)


@pytest.mark.parametrize(
    "offload_gradients, accumulation, clip, sharded, key",
    [
        (False, 1, 1.0, False, "set clip_grad_norm=null"),
        (True, 2, None, False, "optimizer.offload_gradients=false or gradient_accumulation_steps=1"),
        (False, 1, None, True, "fsdp.cpu_offload=true"),
    ],
)
def test_loop_settings_it_cannot_honour_are_refused(offload_gradients, accumulation, clip, sharded, key):
    # The check reads only offload_gradients; building the optimizer itself needs CUDA.
    from types import SimpleNamespace

    from ftcore.training.cpu_offload import CPUOffloadAdamW

    optimizer = SimpleNamespace(offload_gradients=offload_gradients)
    with pytest.raises(ValueError, match=key):
        CPUOffloadAdamW.check_loop_settings(optimizer, accumulation, clip, sharded)
    CPUOffloadAdamW.check_loop_settings(optimizer, 1 if offload_gradients else 4, None, False)  # allowed
