"""The optimizer step fused into the backward against the ordinary path (one optimizer, stepped after
the backward): AdamW and SGD update each tensor on its own, so the weights, the lr schedule and the
gradient norm must agree; a saved and reloaded state resumes bit for bit."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from ftcore.training import OptimizerInBackward, adamw, cosine_with_warmup
from ftcore.training.optim_in_backward import check_optimizer_in_backward

STEPS, WARMUP = 6, 3
DATA_X = torch.linspace(-1, 1, 8 * 4).reshape(8, 4)
DATA_Y = DATA_X.sum(dim=1, keepdim=True) ** 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    # The first layer frozen: it has no optimizer and no hook, as in LoRA.
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    model[0].requires_grad_(False)
    return model


def _make_adamw(params):
    return adamw(params, lr=0.05, weight_decay=0.1)


def _build(in_backward: bool, make=_make_adamw):
    model = _model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = OptimizerInBackward(trainable, make) if in_backward else make(trainable)
    scheduler = cosine_with_warmup(optimizer, num_warmup_steps=WARMUP, num_training_steps=STEPS)
    return model, trainable, optimizer, scheduler


def _train(model, trainable, optimizer, scheduler, steps, in_backward):
    """Steps as ftcore's loop takes them; returns the (lr, grad_norm) of each step."""
    logged = []
    for step in range(steps):
        rows = slice(step % 2 * 4, step % 2 * 4 + 4)
        loss = ((model(DATA_X[rows]) - DATA_Y[rows]) ** 2).mean()
        loss.backward()
        if in_backward:
            assert all(p.grad is None for p in trainable), "every gradient is freed in the backward"
            norm = optimizer.take_grad_norm()
        else:
            norm = float(torch.nn.utils.clip_grad_norm_(trainable, float("inf")))
        logged.append((optimizer.param_groups[0]["lr"], norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    return logged


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("make", [_make_adamw, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)])
def test_same_weights_lrs_and_grad_norms_as_one_optimizer(make):
    reference = _build(False, make)
    expected_log = _train(*reference, STEPS, in_backward=False)
    fused = _build(True, make)
    actual_log = _train(*fused, STEPS, in_backward=True)

    assert [lr for lr, _ in actual_log] == [lr for lr, _ in expected_log]
    assert expected_log[0][0] == 0.0 and expected_log[WARMUP][0] > expected_log[1][0]  # warmup ran
    for (_, expected), (_, actual) in zip(expected_log, actual_log):
        assert actual == pytest.approx(expected, rel=1e-6)
    # The scheduler reached every per-parameter optimizer, not only the first.
    assert {g["lr"] for g in fused[2].param_groups} == {reference[2].param_groups[0]["lr"]}
    for expected, actual in zip(_weights(reference[0]), _weights(fused[0])):
        torch.testing.assert_close(actual, expected, atol=1e-7, rtol=1e-6)
    assert not torch.equal(_weights(fused[0])[2], _weights(_model())[2]), "the weights trained"


def _round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("stop_after", [2, 4])  # in the warmup, after it
def test_save_and_resume_is_bit_identical(stop_after):
    straight = _build(True)
    _train(*straight, STEPS, in_backward=True)

    first = _build(True)
    _train(*first, stop_after, in_backward=True)
    saved = _round_trip(
        {
            "model": first[0].state_dict(),
            "optimizer": first[2].state_dict(),
            "scheduler": first[3].state_dict(),
        }
    )
    resumed = _build(True)
    resumed[0].load_state_dict(saved["model"])
    resumed[2].load_state_dict(saved["optimizer"])
    resumed[3].load_state_dict(saved["scheduler"])
    # load_state_dict gives each optimizer new group dicts; the schedule must still reach them.
    assert resumed[2].param_groups[-1]["lr"] == first[2].param_groups[-1]["lr"]
    for step in range(stop_after, STEPS):  # the data of the remaining steps, as the straight run saw it
        rows = slice(step % 2 * 4, step % 2 * 4 + 4)
        ((resumed[0](DATA_X[rows]) - DATA_Y[rows]) ** 2).mean().backward()
        resumed[2].step()
        resumed[3].step()
    for expected, actual in zip(_weights(straight[0]), _weights(resumed[0])):
        assert torch.equal(actual, expected)


def test_state_of_another_optimizer_layout_is_refused():
    _, trainable, optimizer, _ = _build(True)
    with pytest.raises(ValueError, match="optimizer_in_backward"):
        optimizer.load_state_dict(_make_adamw(trainable).state_dict())
    with pytest.raises(ValueError, match="4 per-parameter optimizers"):
        optimizer.load_state_dict({"per_parameter": optimizer.state_dict()["per_parameter"][:2]})


def test_a_per_parameter_checkpoint_is_refused_by_an_ordinary_optimizer(tmp_path):
    from ftcore.training import TrainingProgress, load_training_state, save_training_state

    _, trainable, optimizer, _ = _build(True)
    progress = TrainingProgress(step=1, epoch=0, batches_in_epoch=1, sampler_seed=0)
    save_training_state(tmp_path, optimizer=optimizer, scheduler=None, progress=progress)
    with pytest.raises(ValueError, match=r"resume it with optimizer_in_backward=true"):
        load_training_state(tmp_path, optimizer=_make_adamw(trainable), scheduler=None)


@pytest.mark.parametrize(
    "accumulation, clip, sharded, key",
    [
        (2, None, False, "gradient_accumulation_steps=1"),
        (1, 1.0, False, "clip_grad_norm=null"),
        (1, None, True, "torchrun"),
    ],
)
def test_settings_that_need_all_gradients_at_once_are_refused(accumulation, clip, sharded, key):
    with pytest.raises(ValueError, match=key) as error:
        check_optimizer_in_backward(accumulation, clip, sharded)
    assert "optimizer_in_backward=false" in str(error.value)


def test_allowed_settings_pass():
    check_optimizer_in_backward(1, None, False)
