"""Accumulated gradients equal one big batch's, with torch's F.cross_entropy as the reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ftcore.modules.loss import cross_entropy_sum
from ftcore.training import accumulate_gradients, count_trained_tokens
from ftcore.training.accumulation import eager_micro_step

V, D, T = 17, 8, 9


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(V, D), nn.Linear(D, V))


def make_micro_batches():
    torch.manual_seed(1)
    batches = []
    for masked_prefix in (1, 6, 3):  # very different trained-token counts per micro-batch
        tokens = torch.randint(0, V, (2, T))
        labels = tokens.clone()
        labels[:, :masked_prefix] = -100
        batches.append({"tokens": tokens, "labels": labels})
    return batches


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_accumulation_equals_one_big_batch():
    batches = make_micro_batches()
    model = make_model()
    step = accumulate_gradients(
        batches, eager_micro_step(lambda b: cross_entropy_sum(model(b["tokens"]), b["labels"]))
    )
    accumulated = grads(model)

    reference = make_model()
    tokens = torch.cat([b["tokens"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    logits = reference(tokens)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    loss.backward()
    assert step.num_tokens == int((labels[:, 1:] != -100).sum()) == 2 * (8 + 3 + 6)
    assert abs(step.loss - loss.item()) < 1e-5
    for ours, theirs in zip(accumulated, grads(reference)):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)

    # The naive mean of per-micro-batch means differs, so the test above can tell them apart.
    naive = make_model()
    for b in batches:
        s, n = cross_entropy_sum(naive(b["tokens"]), b["labels"])
        (s / n / len(batches)).backward()
    assert not torch.allclose(grads(naive)[1], grads(reference)[1], atol=1e-5)


def test_fully_masked_batch_gives_zero_loss_and_grads():
    model = make_model()
    batch = make_micro_batches()[0]
    batch["labels"][:] = -100
    assert count_trained_tokens(batch["labels"]) == 0
    step = accumulate_gradients(
        [batch], eager_micro_step(lambda b: cross_entropy_sum(model(b["tokens"]), b["labels"]))
    )
    assert step.loss == 0.0 and step.num_tokens == 0
    assert all(torch.count_nonzero(g) == 0 for g in grads(model))
