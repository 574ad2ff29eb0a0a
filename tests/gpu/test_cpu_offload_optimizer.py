"""torchao's CPU-offload AdamW (ftcore.training.cpu_offload_adamw) on CUDA (`pytest -m gpu`), against
torch's AdamW on the GPU: same hyper-parameters, same data, fp32; the weights must agree within float
rounding (the CPU runs the fused CPU AdamW kernel, the reference the CUDA one). Also: the grad_norm the
loop logs, exact resume from a saved state, and a real `full_finetune` run with it and with
`optimizer_in_backward`, each against the ordinary adamw run."""

from __future__ import annotations

import io
import json

import pytest
import torch
from torch import nn

from ftcore.config import apply_overrides, load_config
from ftcore.training import adamw, cpu_offload_adamw
from tests.recipes.helpers import run, trained_weights

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
STEPS = 5


def _model() -> nn.Module:
    torch.manual_seed(0)
    # 64x128 and 128x64 weights are offloaded (>= 4096 elements); the biases and the 8x64 head stay on the GPU.
    return nn.Sequential(
        nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 8)
    ).cuda()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 64, generator=generator)
    return x.cuda(), x[:, :8].sin().cuda()


def _train(model, optimizer, steps: range) -> list[float]:
    norms = []
    for step in steps:
        x, y = _batch(step)
        ((model(x) - y) ** 2).mean().backward()
        if hasattr(optimizer, "take_grad_norm"):
            norms.append(optimizer.take_grad_norm())
        else:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return norms


def _assert_close_weights(expected: nn.Module, actual: nn.Module, atol: float = 1e-5) -> None:
    for (name, e), a in zip(expected.named_parameters(), actual.parameters()):
        torch.testing.assert_close(a.detach(), e.detach(), atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("offload_gradients", [False, True])
def test_cpu_offload_adamw_matches_adamw(offload_gradients):
    reference = _model()
    expected_norms = _train(reference, adamw(reference.parameters(), **HYPER, fused=False), range(STEPS))
    model = _model()
    optimizer = cpu_offload_adamw(model.parameters(), **HYPER, offload_gradients=offload_gradients)
    assert optimizer.param_d2h_map and optimizer.d_opt is not None, "both halves (CPU and GPU) are exercised"
    norms = _train(model, optimizer, range(STEPS))
    _assert_close_weights(reference, model)
    assert norms == pytest.approx(expected_norms, rel=1e-5)
    assert not torch.equal(model[0].weight, _model()[0].weight), "the weights trained"


def test_resume_from_saved_state_continues_the_same_run():
    straight = _model()
    _train(straight, cpu_offload_adamw(straight.parameters(), **HYPER), range(STEPS))

    first = _model()
    optimizer = cpu_offload_adamw(first.parameters(), **HYPER)
    _train(first, optimizer, range(2))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    # As the recipe resumes: the optimizer is built on the fresh weights, then the checkpoint is loaded.
    resumed = _model()
    optimizer = cpu_offload_adamw(resumed.parameters(), **HYPER)
    resumed.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    _train(resumed, optimizer, range(2, STEPS))
    _assert_close_weights(straight, resumed, atol=1e-6)


def test_lr_changes_reach_every_tensor_after_a_load():
    # What an LR scheduler does after a resume: set each group's lr. At lr 0 no weight may move.
    model = _model()
    optimizer = cpu_offload_adamw(model.parameters(), **HYPER)
    _train(model, optimizer, range(1))
    optimizer.load_state_dict(optimizer.state_dict())
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, optimizer, range(1, 3))
    for (name, param), old in zip(model.named_parameters(), before):
        assert torch.equal(param.detach(), old), name


def _demo_run(output_dir, *overrides):
    small = [f"output_dir={output_dir}", "device=cuda", "dtype=fp32", "dataset.source.num_rows=128",
             "batch_size=8", "max_steps=6", "shuffle=false", "~dataset_val", "~evaluators",
             "eval_before_training=false", "clip_grad_norm=null", "log_every_n_steps=1",
             "save_every_n_steps=3", "plot_loss_curve=false", "lr_scheduler.num_warmup_steps=2"]  # fmt: skip
    run("full_finetune", apply_overrides(load_config("demo/reverse_full"), small + list(overrides)))
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory):
    """The reference: the same recipe run with the ordinary fused AdamW step."""
    folder = tmp_path_factory.mktemp("adamw")
    return folder, _demo_run(folder, "optimizer._component_=ftcore.training.adamw")


@pytest.mark.parametrize(
    "switch",
    [
        ["optimizer._component_=ftcore.training.cpu_offload_adamw"],
        ["optimizer._component_=ftcore.training.adamw", "optimizer_in_backward=true"],
    ],
    ids=["cpu_offload_adamw", "optimizer_in_backward"],
)
def test_full_finetune_recipe_matches_adamw_and_resumes(tmp_path, adamw_run, switch):
    reference_dir, expected = adamw_run
    actual = _demo_run(tmp_path / "switch", *switch)
    assert sorted(actual) == list(range(1, 7))
    for step, (loss, norm) in expected.items():
        assert actual[step] == pytest.approx((loss, norm), rel=1e-4), step
    reference = trained_weights(reference_dir / "step_000006")
    ours = trained_weights(tmp_path / "switch" / "step_000006")
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, atol=1e-4, rtol=1e-3, msg=name)

    resumed = tmp_path / "resumed"
    _demo_run(resumed, *switch, f"resume_from_checkpoint={tmp_path / 'switch' / 'step_000003'}")
    resumed_weights = trained_weights(resumed / "step_000006")
    for name, tensor in ours.items():
        torch.testing.assert_close(resumed_weights[name], tensor, atol=1e-6, rtol=1e-5, msg=name)
