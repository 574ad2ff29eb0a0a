"""`cuda_graphs` on CPU: what is refused, the batch signature, the gradient binding and the eager fallback.

Capture and replay need a GPU: tests/gpu/test_cuda_graphs_cuda.py compares graphed steps with eager
ones there. The reference here is the plain eager micro-step on the same model and batch.
"""

from __future__ import annotations

import logging

import pytest
import torch

from ftcore.config import apply_overrides, load_config
from ftcore.distributed.parallelize import parallelize
from ftcore.models.builders import lora_transformer_decoder
from ftcore.modules.loss import cross_entropy_sum
from ftcore.paths import CONFIGS_DIR
from ftcore.runner.parts import build_parts
from ftcore.training import OptimizerInBackward
from ftcore.training.accumulation import eager_micro_step
from ftcore.training.cuda_graphs import (
    CudaGraphedMicroStep,
    batch_signature,
    bind_static_grads,
    check_cuda_graphs,
    check_graph_safe_optimizer,
    parameter_fingerprint,
)

CUDA = torch.device("cuda")
ALLOWED = dict(compile=False, activation_offloading=False, sharded=False, optimizer_in_backward=False)


def test_a_cpu_run_with_cuda_graphs_is_refused_before_the_model_is_built(tmp_path):
    cfg = apply_overrides(
        load_config("demo/reverse_lora"), [f"output_dir={tmp_path}", "device=cpu", "cuda_graphs=true"]
    )

    def never_called(model):
        raise AssertionError("the model was built before the refusal")

    with pytest.raises(ValueError, match=r"cuda_graphs: true needs a CUDA GPU, but this run's device is cpu"):
        build_parts(cfg, never_called)


@pytest.mark.parametrize(
    "setting, message",
    [
        ("compile", "cuda_graphs: true and compile: true cannot be combined"),
        ("activation_offloading", "cannot capture enable_activation_offloading"),
        ("sharded", "not supported under torchrun"),
        ("optimizer_in_backward", "cannot capture optimizer_in_backward"),
    ],
)
def test_what_a_graph_cannot_capture_is_refused(setting, message):
    with pytest.raises(ValueError, match=message):
        check_cuda_graphs(CUDA, **{**ALLOWED, setting: True})


def test_a_plain_cuda_run_passes_the_checks():
    check_cuda_graphs(CUDA, **ALLOWED)
    check_graph_safe_optimizer(torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))]))


def test_an_optimizer_stepping_in_the_backward_is_refused():
    params = [torch.nn.Parameter(torch.ones(2))]
    optimizer = OptimizerInBackward(params, lambda ps: torch.optim.AdamW(ps))
    with pytest.raises(ValueError, match="cannot capture OptimizerInBackward"):
        check_graph_safe_optimizer(optimizer)


def test_every_training_config_lists_cuda_graphs_off():
    configs = [path for path in CONFIGS_DIR.rglob("*.yaml") if "fused_kernels:" in path.read_text()]
    assert len(configs) >= 40
    for path in configs:
        assert "\ncuda_graphs: false" in path.read_text(), path


def test_the_signature_is_the_sorted_keys_shapes_and_dtypes():
    batch = {"tokens": torch.zeros(2, 5, dtype=torch.long), "labels": torch.zeros(2, 5, dtype=torch.long)}
    assert batch_signature(batch) == (("labels", (2, 5), torch.long), ("tokens", (2, 5), torch.long))
    assert batch_signature({**batch, "tokens": torch.zeros(2, 6, dtype=torch.long)}) != batch_signature(batch)
    with pytest.raises(TypeError, match="batch key 'lengths' holds a list"):
        batch_signature({**batch, "lengths": [5, 5]})


def test_binding_zeroes_a_cleared_gradient_and_keeps_an_eager_one():
    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(3)]
    static = [torch.full((3,), 7.0) for _ in range(3)]
    params[0].grad = None
    params[1].grad = torch.tensor([1.0, 2.0, 3.0])  # left by an eager micro-batch
    params[2].grad = static[2]  # already bound: untouched
    bind_static_grads(params, static)
    assert all(p.grad is s for p, s in zip(params, static))
    assert params[0].grad.tolist() == [0.0, 0.0, 0.0]
    assert params[1].grad.tolist() == [1.0, 2.0, 3.0]
    assert params[2].grad.tolist() == [7.0, 7.0, 7.0]


def test_shapes_beyond_the_graph_limit_run_eagerly_with_one_warning(caplog):
    """With no graph allowed every call takes the eager path, and its gradients are the eager step's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11))

    def sum_loss(batch):
        return cross_entropy_sum(model(batch["tokens"]), batch["labels"])

    batches = [
        {"tokens": torch.randint(0, 11, (2, n)), "labels": torch.randint(0, 11, (2, n))} for n in (4, 5)
    ]
    expected = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        expected.append((eager_micro_step(sum_loss)(batch, 7), [p.grad.clone() for p in model.parameters()]))
    step = CudaGraphedMicroStep(sum_loss, list(model.parameters()), torch.device("cpu"), max_graphs=0)
    with caplog.at_level(logging.WARNING, logger="ftcore"):
        for batch, (loss, grads) in zip(batches, expected):
            model.zero_grad(set_to_none=True)
            assert torch.equal(step(batch, 7), loss)
            assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert step.num_graphs == 0
    warnings = [r.message for r in caplog.records if "run eagerly" in r.message]
    assert len(warnings) == 1 and "labels [2, 4]" in warnings[0]


@pytest.mark.parametrize("dropout, stashed", [(0.0, False), (0.1, True)])
def test_checkpointing_stashes_the_rng_state_only_for_blocks_that_draw_from_it(dropout, stashed):
    """Without dropout the recompute draws nothing, so no RNG state is saved (nor queried in a capture)."""
    model = lora_transformer_decoder(
        ["q_proj"], lora_dropout=dropout, vocab_size=16, dim=8, n_layers=2, n_heads=2, n_kv_heads=1,
        hidden_dim=16, max_seq_len=8,
    )  # fmt: skip
    parallelize(model, activation_checkpointing=True)
    assert [block.forward.keywords["preserve_rng_state"] for block in model.layers] == [stashed, stashed]


def test_the_cpu_offload_optimizer_is_refused_from_its_config_name_before_the_model_is_built():
    with pytest.raises(ValueError, match="cannot capture optimizer `ftcore.training.cpu_offload_adamw`"):
        check_cuda_graphs(CUDA, **ALLOWED, optimizer_component="ftcore.training.cpu_offload_adamw")


def test_an_eager_micro_batch_after_a_capture_adds_into_the_static_gradients():
    """A new shape's warm-up or a fallback must not allocate a second set of gradients (full fine-tuning: GiBs)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11))
    params = list(model.parameters())

    def sum_loss(batch):
        return cross_entropy_sum(model(batch["tokens"]), batch["labels"])

    batch = {"tokens": torch.randint(0, 11, (2, 4)), "labels": torch.randint(0, 11, (2, 4))}
    eager_micro_step(sum_loss)(batch, 3)
    expected = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    step = CudaGraphedMicroStep(sum_loss, params, torch.device("cpu"), max_graphs=0)
    step._grads = [torch.full_like(p, 5.0) for p in params]  # as a capture leaves them
    step(batch, 3)
    for param, static, grad in zip(params, step._grads, expected):
        assert param.grad is static
        torch.testing.assert_close(param.grad, grad)  # zeroed on binding, then the eager gradient added


def test_a_parameter_without_a_static_gradient_keeps_none():
    params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))]
    static = [torch.zeros(2), None]
    bind_static_grads(params, static)
    assert params[0].grad is static[0] and params[1].grad is None


def test_a_graphed_step_needs_a_warm_up():
    with pytest.raises(ValueError, match="warmup_calls >= 1"):
        CudaGraphedMicroStep(lambda batch: None, [], CUDA, warmup_calls=0)


def test_a_replay_after_a_parameter_moved_or_was_frozen_is_refused():
    params = [torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))]
    step = CudaGraphedMicroStep(lambda batch: (torch.zeros(()), 0), params, torch.device("cpu"))
    step._captured_params = parameter_fingerprint(params)  # as the first capture records them
    step._check_capture_still_valid()  # nothing changed: passes
    params[1].requires_grad_(False)
    with pytest.raises(RuntimeError, match="parameter 1 .* requires_grad changed"):
        step._check_capture_still_valid()
    params[1].requires_grad_(True)
    params[0].data = torch.zeros(4)  # new memory, as .to() or load_state_dict(assign=True) give
    with pytest.raises(RuntimeError, match="parameter 0 was moved to new memory"):
        step._check_capture_still_valid()


def test_a_replay_after_a_module_changed_train_eval_mode_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1))
    params = list(model.parameters())
    step = CudaGraphedMicroStep(lambda batch: (torch.zeros(()), 0), params, torch.device("cpu"), model=model)
    step._captured_params = parameter_fingerprint(params)  # as the first capture records them
    step._captured_modes = [module.training for module in model.modules()]
    step._check_capture_still_valid()  # nothing changed: passes
    model[1].eval()
    with pytest.raises(RuntimeError, match="module `1` was switched to eval mode .* call model.train"):
        step._check_capture_still_valid()
    model.train()
    step._check_capture_still_valid()
