"""DPOLoss against the paper's formula (Rafailov et al. 2023, eq. 7) computed independently here: full
logits and log_softmax from a separate reference model (a plain copy of the base weights, not the
adapters-off switch), and the paper's gradient at initialization (section 4)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import ftcore.models as M
from ftcore.modules.lora import get_adapter_params, lora_modules, set_trainable_params
from ftcore.modules.loss import logits_sequence_log_probs, sequence_log_probs
from ftcore.runner.dpo import DPOLoss

VOCAB = 64


def _tiny_lora(apply_lora_to_output: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = M.lora_tiny_llama(["q_proj", "v_proj"], apply_lora_to_mlp=True, vocab_size=VOCAB, lora_rank=4,
                              tie_embeddings=not apply_lora_to_output, apply_lora_to_output=apply_lora_to_output)  # fmt: skip
    M.init_weights(model)
    set_trainable_params(model, get_adapter_params(model))
    return model


def _pair_batch(pairs: int = 3, length: int = 12) -> dict:
    """Rows 0..pairs-1 chosen, pairs..2*pairs-1 rejected; the prompt (first 4 tokens) and padding masked."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2 * pairs, length), generator=generator)
    labels = tokens.clone()
    labels[:, :4] = -100
    labels[1, 9:] = -100  # a shorter chosen answer (right padding)
    return {"tokens": tokens, "labels": labels}


def _reference_log_probs(model, batch) -> torch.Tensor:
    """Sum over trained positions of log_softmax(logits)[label], from the whole logits tensor."""
    logits = model(batch["tokens"]).float()[:, :-1]
    labels = batch["labels"][:, 1:]
    picked = logits.log_softmax(-1).gather(2, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (picked * (labels != -100)).sum(1)


def _plain_copy_of_base(model) -> torch.nn.Module:
    """The reference model as a separate module: the LoRA model with every adapter product zeroed."""
    reference = copy.deepcopy(model)
    for _, module in lora_modules(reference):
        torch.nn.init.zeros_(module.lora_b.weight)
    return reference


def _perturb_adapters(model) -> None:
    with torch.no_grad():
        for _, module in lora_modules(model):
            module.lora_b.weight.normal_(0, 0.05)


@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
def test_sequence_log_probs_match_full_logits(chunk_size):
    model = _tiny_lora()
    _perturb_adapters(model)
    batch = _pair_batch()
    expected = _reference_log_probs(model, batch)
    hidden = model.hidden(batch["tokens"])
    ours = sequence_log_probs(hidden, model.output_weight, batch["labels"], chunk_size)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits_sequence_log_probs(model(batch["tokens"]), batch["labels"]), expected)
    grads = torch.autograd.grad(ours.sum(), list(get_adapter_params(model).values()))
    expected_grads = torch.autograd.grad(expected.sum(), list(get_adapter_params(model).values()))
    for ours_grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(ours_grad, expected_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("lora_output", [False, True])
def test_loss_is_the_papers_formula_against_a_separate_reference_model(label_smoothing, lora_output):
    model = _tiny_lora(apply_lora_to_output=lora_output)
    _perturb_adapters(model)
    reference_model = _plain_copy_of_base(model)
    batch, beta = _pair_batch(), 0.3
    loss_sum, pairs = DPOLoss(beta=beta, label_smoothing=label_smoothing, chunk_size=7)(model, batch)

    with torch.no_grad():
        reference = _reference_log_probs(reference_model, batch)
    policy = _reference_log_probs(model, batch)
    chosen, rejected = (policy - reference).chunk(2)
    h = beta * (chosen - rejected)
    expected = (-(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)).sum()
    assert int(pairs) == 3
    torch.testing.assert_close(loss_sum, expected, rtol=1e-5, atol=1e-6)


def test_at_initialization_loss_is_log_2_and_gradient_is_the_papers():
    # With B = 0 the policy is the reference: h = 0, the loss is log 2 per pair, and by the paper's
    # gradient, d loss / d theta = -beta * sigmoid(0) * d(log pi(y_w) - log pi(y_l)) / d theta.
    model, batch, beta = _tiny_lora(), _pair_batch(), 0.1
    adapters = list(get_adapter_params(model).values())
    loss_sum, pairs = DPOLoss(beta=beta)(model, batch)
    assert loss_sum.item() == pytest.approx(3 * math.log(2), rel=1e-6)
    grads = torch.autograd.grad(loss_sum, adapters)
    chosen, rejected = _reference_log_probs(model, batch).chunk(2)
    expected = torch.autograd.grad(-beta * 0.5 * (chosen - rejected).sum(), adapters)
    assert any(g.abs().max() > 0 for g in expected)
    for ours, theirs in zip(grads, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-7)


def test_metrics_are_the_implicit_rewards_over_the_pairs_seen():
    model = _tiny_lora()
    _perturb_adapters(model)
    loss, batch = DPOLoss(beta=0.5), _pair_batch()
    loss(model, batch)
    loss(model, batch)  # a second micro-batch of the same step
    with torch.no_grad():
        rewards = 0.5 * (
            _reference_log_probs(model, batch) - _reference_log_probs(_plain_copy_of_base(model), batch)
        )
    chosen, rejected = rewards.chunk(2)
    metrics = loss.pop_metrics()
    assert metrics["rewards_chosen"] == pytest.approx(chosen.mean().item(), abs=1e-5)
    assert metrics["rewards_rejected"] == pytest.approx(rejected.mean().item(), abs=1e-5)
    assert metrics["rewards_margin"] == pytest.approx((chosen - rejected).mean().item(), abs=1e-5)
    assert metrics["rewards_accuracy"] == pytest.approx((chosen > rejected).float().mean().item())
    assert loss.pop_metrics() == {}  # reset once read


def test_refusals_name_the_fix():
    with pytest.raises(ValueError, match="beta must be > 0"):
        DPOLoss(beta=0.0)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        DPOLoss(label_smoothing=0.5)
    torch.manual_seed(0)
    plain = M.tiny_llama(vocab_size=VOCAB)
    with pytest.raises(ValueError, match="needs a model with LoRA adapters.*lora_dpo recipe"):
        DPOLoss()(plain, _pair_batch())
