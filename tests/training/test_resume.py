"""Exact resume: stop after k steps, save, rebuild everything fresh, load, finish == never stopped."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from ftcore.training import (
    adamw,
    cosine_with_warmup,
    find_latest_checkpoint,
    load_training_state,
    save_training_state,
)
from ftcore.training.state import TrainingProgress

N_EXAMPLES, BATCH, TOTAL_STEPS, SAMPLER_SEED = 12, 3, 10, 1234  # 4 batches per epoch, 2.5 epochs


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 1))
    optimizer = adamw(model.parameters(), lr=0.05, weight_decay=0.1)
    scheduler = cosine_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=TOTAL_STEPS)
    return model, optimizer, scheduler


DATA_X = torch.linspace(-1, 1, N_EXAMPLES * 4).reshape(N_EXAMPLES, 4)
DATA_Y = DATA_X.sum(dim=1, keepdim=True) ** 2


def batches_of_epoch(epoch, skip):
    order = torch.randperm(N_EXAMPLES, generator=torch.Generator().manual_seed(SAMPLER_SEED + epoch))
    for index in range(skip, N_EXAMPLES // BATCH):
        yield index, order[index * BATCH : (index + 1) * BATCH]


def train(model, optimizer, scheduler, progress, stop_at):
    while progress.step < stop_at:
        for index, ids in batches_of_epoch(progress.epoch, progress.batches_in_epoch):
            # Python/NumPy randomness in the step too (e.g. data augmentation), resumed as well.
            noise = random.random() * 1e-3 + float(np.random.rand()) * 1e-3
            loss = ((model(DATA_X[ids]) - DATA_Y[ids]) ** 2).mean() + noise
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            progress.step += 1
            progress.batches_in_epoch = index + 1
            if progress.step == stop_at:
                return
        progress.epoch, progress.batches_in_epoch = progress.epoch + 1, 0


@pytest.mark.parametrize("stop_after", [3, 4, 7])  # mid-epoch, at an epoch boundary, later epoch
def test_resume_is_bit_identical(tmp_path, stop_after):
    random.seed(7)
    np.random.seed(7)
    model, optimizer, scheduler = build()
    train(model, optimizer, scheduler, TrainingProgress(0, 0, 0, SAMPLER_SEED), TOTAL_STEPS)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    random.seed(7)
    np.random.seed(7)
    model, optimizer, scheduler = build()
    progress = TrainingProgress(0, 0, 0, SAMPLER_SEED)
    train(model, optimizer, scheduler, progress, stop_after)
    checkpoint = tmp_path / f"step_{stop_after}"
    checkpoint.mkdir()
    torch.save(model.state_dict(), checkpoint / "model.pt")
    save_training_state(checkpoint, optimizer=optimizer, scheduler=scheduler, progress=progress)

    # A new process would start with other RNG states: scramble them to prove they are restored.
    torch.manual_seed(999), random.seed(999), np.random.seed(999)
    latest = find_latest_checkpoint(tmp_path)
    assert latest == checkpoint
    model, optimizer, scheduler = build()
    model.load_state_dict(torch.load(latest / "model.pt"))
    resumed = load_training_state(latest, optimizer=optimizer, scheduler=scheduler)
    assert (resumed.step, resumed.sampler_seed) == (stop_after, SAMPLER_SEED)
    train(model, optimizer, scheduler, resumed, TOTAL_STEPS)
    for ours, reference in zip(model.parameters(), uninterrupted):
        assert torch.equal(ours, reference)


def test_load_without_state_is_a_clear_error(tmp_path):
    _, optimizer, scheduler = build()
    with pytest.raises(ValueError, match="training_state.pt"):
        load_training_state(tmp_path, optimizer=optimizer, scheduler=scheduler)


@pytest.mark.parametrize(
    "resumed_total, resumed_lr", [(TOTAL_STEPS, 0.05), (TOTAL_STEPS + 2, 0.05), (TOTAL_STEPS + 2, 0.01)]
)
def test_resumed_lr_follows_this_runs_schedule(tmp_path, resumed_total, resumed_lr, caplog):
    # A finished cosine leaves lr 0 in the optimizer state; a longer resumed run must not train a step at it.
    from ftcore.training.state import follow_this_runs_schedule

    model, optimizer, scheduler = build()
    for _ in range(TOTAL_STEPS):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.0
    progress = TrainingProgress(step=TOTAL_STEPS, epoch=2, batches_in_epoch=2, sampler_seed=SAMPLER_SEED)
    save_training_state(tmp_path, optimizer=optimizer, scheduler=scheduler, progress=progress)

    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 1))
    optimizer = adamw(model.parameters(), lr=resumed_lr, weight_decay=0.1)
    scheduler = cosine_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=resumed_total)
    base_lrs = list(scheduler.base_lrs)
    load_training_state(tmp_path, optimizer=optimizer, scheduler=scheduler)
    follow_this_runs_schedule(scheduler, tmp_path, base_lrs)
    expected = resumed_lr * scheduler.lr_lambdas[0](TOTAL_STEPS)
    assert optimizer.param_groups[0]["lr"] == expected == scheduler.get_last_lr()[0]
    assert (expected > 0) == (resumed_total > TOTAL_STEPS)
    assert ("different lr or schedule" in caplog.text) == (resumed_total > TOTAL_STEPS)
