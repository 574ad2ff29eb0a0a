"""Cross-entropy sums against a float64 log-softmax written out by hand, and chunked == plain."""

from __future__ import annotations

import pytest
import torch

from ftcore.modules.loss import chunked_cross_entropy_sum, cross_entropy_sum

B, T, D, V = 3, 7, 16, 23


def make_batch(seed=0):
    torch.manual_seed(seed)
    hidden = torch.randn(B, T, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    labels[0, :4] = -100  # a masked prompt
    labels[2, 5:] = -100  # padding
    return hidden, weight, labels


def reference_sum(logits, labels):
    """Per position t, -log p(labels[t+1]) in float64, summed over positions whose label is trained."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    for b in range(labels.size(0)):
        for t in range(labels.size(1) - 1):
            target = int(labels[b, t + 1])
            if target != -100:
                total = total - log_probs[b, t, target]
                count += 1
    return total, count


def test_cross_entropy_sum_matches_hand_reference():
    hidden, weight, labels = make_batch()
    logits = hidden @ weight.T
    loss_sum, count = cross_entropy_sum(logits, labels)
    expected, expected_count = reference_sum(logits.detach(), labels)
    assert int(count) == expected_count == (labels[:, 1:] != -100).sum()
    assert loss_sum.dtype == torch.float32
    torch.testing.assert_close(loss_sum.double(), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("skip_ignored", [True, False], ids=["skip-ignored", "static-shapes"])
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 1000])
def test_chunked_equals_plain_values_and_grads(chunk_size, skip_ignored):
    hidden, weight, labels = make_batch(1)
    plain_sum, plain_count = cross_entropy_sum(hidden @ weight.T, labels)
    plain_sum.backward()
    grads_plain = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    chunked_sum, chunked_count = chunked_cross_entropy_sum(
        hidden, weight, labels, chunk_size=chunk_size, skip_ignored=skip_ignored
    )
    chunked_sum.backward()
    assert int(chunked_count) == int(plain_count)
    torch.testing.assert_close(chunked_sum, plain_sum, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(hidden.grad, grads_plain[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, grads_plain[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("skip_ignored", [True, False], ids=["skip-ignored", "static-shapes"])
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_a_frozen_weight_takes_the_fused_path_with_the_plain_values_and_input_grads(chunk_size, skip_ignored):
    """LoRA's output weight is frozen: the input gradient is computed in the forward, as the plain one."""
    hidden, weight, labels = make_batch(3)
    weight.requires_grad_(False)
    plain_sum, _ = cross_entropy_sum(hidden @ weight.T, labels)
    (plain_sum * 0.37).backward()  # an upstream scale, as the training step's 1 / trained tokens
    expected_grad, hidden.grad = hidden.grad.clone(), None
    fused_sum, count = chunked_cross_entropy_sum(
        hidden, weight, labels, chunk_size, skip_ignored=skip_ignored
    )
    assert "FrozenWeight" in type(fused_sum.grad_fn).__name__
    (fused_sum * 0.37).backward()
    assert int(count) == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(fused_sum, plain_sum, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(hidden.grad, expected_grad, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(hidden.grad[0, :3]) == 0  # positions whose next label is masked


def test_the_fused_path_in_bf16_matches_autograd_through_fp32_logits():
    hidden, weight, labels = make_batch(4)
    hidden16 = hidden.detach().bfloat16().requires_grad_()
    weight16 = weight.detach().bfloat16()
    plain, _ = cross_entropy_sum(hidden16 @ weight16.T, labels)
    (plain / 50).backward()
    expected_grad, hidden16.grad = hidden16.grad.clone(), None
    fused, _ = chunked_cross_entropy_sum(hidden16, weight16, labels, chunk_size=4)
    (fused / 50).backward()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(hidden16.grad, expected_grad, rtol=1e-2, atol=1e-4)


def test_the_fused_path_ignores_a_non_finite_score_at_a_masked_position():
    hidden, weight, labels = make_batch(5)
    weight.requires_grad_(False)
    with torch.no_grad():
        hidden[0, 2] = float("inf")  # position 2 predicts label 3, which is masked
    loss, _ = chunked_cross_entropy_sum(hidden, weight, labels, chunk_size=4, skip_ignored=False)
    (grad,) = torch.autograd.grad(loss, hidden)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_chunked_bf16_upcasts_per_chunk():
    hidden, weight, labels = make_batch(2)
    hidden16, weight16 = hidden.detach().bfloat16(), weight.detach().bfloat16()
    chunked, _ = chunked_cross_entropy_sum(hidden16, weight16, labels, chunk_size=3)
    plain, _ = cross_entropy_sum(hidden16 @ weight16.T, labels)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("skip_ignored", [True, False], ids=["skip-ignored", "static-shapes"])
def test_all_masked_batch_gives_zero_and_backpropagates(skip_ignored):
    hidden, weight, labels = make_batch()
    labels[:] = -100
    loss_sum, count = chunked_cross_entropy_sum(hidden, weight, labels, skip_ignored=skip_ignored)
    loss_sum.backward()
    assert int(count) == 0 and float(loss_sum.detach()) == 0.0
    assert torch.count_nonzero(hidden.grad) == 0


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"labels \(B, T\)"):
        cross_entropy_sum(torch.randn(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))
