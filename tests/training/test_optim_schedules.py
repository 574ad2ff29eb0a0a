"""Schedules against transformers' implementations and their formulas; optimizers and clipping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ftcore.training import (
    adamw,
    adamw_8bit,
    clip_grad_norm_,
    constant_with_warmup,
    cosine_with_warmup,
    linear_with_warmup,
    sgd,
)


def lrs(make_schedule, steps, base_lr=2.0):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base_lr)
    schedule = make_schedule(optimizer)
    values = []
    for _ in range(steps):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return values


@pytest.mark.parametrize(
    "ours, hf_name, kwargs",
    [
        (
            cosine_with_warmup,
            "get_cosine_schedule_with_warmup",
            {"num_warmup_steps": 3, "num_training_steps": 20},
        ),
        (
            linear_with_warmup,
            "get_linear_schedule_with_warmup",
            {"num_warmup_steps": 4, "num_training_steps": 15},
        ),
        (constant_with_warmup, "get_constant_schedule_with_warmup", {"num_warmup_steps": 5}),
    ],
)
def test_schedules_match_transformers(ours, hf_name, kwargs):
    transformers = pytest.importorskip("transformers")
    hf = getattr(transformers, hf_name)
    # Up to the end of training: past it transformers' cosine rises again, ours stays at the floor.
    steps = kwargs.get("num_training_steps", 24) + 1
    expected = lrs(lambda opt: hf(opt, **kwargs), steps)
    got = lrs(lambda opt: ours(opt, **kwargs), steps)
    assert got == pytest.approx(expected, abs=1e-12)


def test_min_lr_ratio_floor_by_formula():
    base, warm, total, floor = 2.0, 2, 12, 0.1
    cosine = lrs(lambda o: cosine_with_warmup(o, warm, total, min_lr_ratio=floor), 15, base)
    linear = lrs(lambda o: linear_with_warmup(o, warm, total, min_lr_ratio=floor), 15, base)
    assert cosine[:2] == [0.0, 1.0] and cosine[2] == base
    step = 7
    progress = (step - warm) / (total - warm)
    assert cosine[step] == pytest.approx(
        base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
    )
    assert linear[step] == pytest.approx(base * (floor + (1 - floor) * (total - step) / (total - warm)))
    assert cosine[total:] == pytest.approx([base * floor] * 3)
    assert linear[total:] == pytest.approx([base * floor] * 3)


def test_warmup_longer_than_training_warns_and_stays_in_warmup(caplog):
    """A short smoke test of a config with a long warmup runs (as in transformers), with a warning."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = cosine_with_warmup(optimizer, num_warmup_steps=10, num_training_steps=5)
    assert "fewer than num_warmup_steps (10)" in caplog.text and "peaks at 40%" in caplog.text
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_clip_grad_norm_returns_preclip_norm_and_clips():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 12.0])
    norm = clip_grad_norm_([a, b], max_norm=1.0)
    assert norm == pytest.approx(13.0)  # sqrt(9 + 16 + 144)
    clipped = torch.cat([a.grad, b.grad]).norm()
    assert clipped.item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(b.grad, torch.tensor([0.0, 12.0]) / 13.0, rtol=1e-5, atol=1e-6)


def quadratic_descent(make_optimizer, steps=20):
    torch.manual_seed(0)
    param = nn.Parameter(torch.randn(256))
    optimizer = make_optimizer([param])
    start = param.detach().pow(2).sum().item()
    for _ in range(steps):
        optimizer.zero_grad()
        param.pow(2).sum().backward()
        optimizer.step()
    return start, param.detach().pow(2).sum().item(), optimizer


def test_adamw_is_unfused_on_cpu_and_matches_torch():
    start, end, optimizer = quadratic_descent(lambda p: adamw(p, lr=0.05, weight_decay=0.01))
    assert not optimizer.defaults["fused"] and end < start
    _, reference_end, _ = quadratic_descent(lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.01))
    assert end == pytest.approx(reference_end, rel=1e-6)


def test_sgd_and_8bit_adamw_descend_on_cpu():
    start, end, _ = quadratic_descent(lambda p: sgd(p, lr=0.1, momentum=0.5))
    assert end < 0.1 * start
    start, end, optimizer = quadratic_descent(lambda p: adamw_8bit(p, lr=0.05), steps=10)
    assert type(optimizer).__name__ == "AdamW8bit" and end < start


def test_no_trainable_params_is_a_clear_error():
    with pytest.raises(ValueError, match="requires_grad"):
        adamw([])
