"""A checkpoint's recompute leaves out the closing projection's GEMMs (ftcore.modules.recompute), on CPU.

References: the same LoRA / QLoRA blocks without checkpointing (autograd's plain graph), fp32 and
float64, seeded alike; the GEMMs the backward runs, counted by a dispatch mode.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from ftcore.distributed.parallelize import parallelize
from ftcore.modules.lora import LoRALinear
from ftcore.modules.recompute import Recomputing, is_recomputing, marked_recompute_contexts
from ftcore.training.selective_checkpoint import CheckpointPlan
from tests.training.test_activation_offload import blocks_loss_and_grads
from tests.training.test_selective_checkpoint import TIGHT, CountGemms, build, inputs_for

LAYOUTS = {
    "checkpoint": dict(activation_checkpointing=True),
    "every 2nd block": dict(activation_checkpointing=True, ac_mode="selective", ac_option=2),
    "offload": dict(activation_checkpointing=True, activation_offloading=True),
    "chunked mlp": dict(activation_checkpointing=True, mlp_chunk_tokens=7),
    "chunked mlp only": dict(mlp_chunk_tokens=7),
}


def run(kind: str, backward_context=None, **options):
    model = build(kind)
    parallelize(model, **options)
    return model, blocks_loss_and_grads(model, *inputs_for(model), backward_context=backward_context)


@pytest.mark.parametrize("kind", ["lora", "qlora"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_recompute_without_the_closing_gemms_gives_the_plain_gradients(kind, layout):
    _, (ref_loss, ref_grads, ref_input_grad) = run(kind)
    model, (loss, grads, input_grad) = run(kind, **LAYOUTS[layout])
    assert any(
        module.skip_output_in_recompute for module in model.modules() if isinstance(module, LoRALinear)
    )
    torch.testing.assert_close(loss, ref_loss, **TIGHT)
    torch.testing.assert_close(input_grad, ref_input_grad, **TIGHT)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], **TIGHT, msg=name)


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_each_recompute_leaves_out_the_base_and_adapter_gemms_of_the_down_projection(kind):
    plain, checkpointed = CountGemms(), CountGemms()
    run(kind, backward_context=plain)
    model, _ = run(kind, backward_context=checkpointed, activation_checkpointing=True)
    forward = CountGemms()
    with forward, torch.no_grad():  # the forward's GEMMs: 3 per LoRA layer (base, A, B)
        run_blocks(model)
    # the recompute reruns the forward but the down projection's base GEMM and adapter-B product
    assert checkpointed.count - plain.count == forward.count - 2 * len(model.layers)


def run_blocks(model):
    x, pos, mask = inputs_for(model)
    for layer in model.layers:
        x = layer(x, pos, mask, cache_pos=None)


def test_only_each_blocks_down_projection_is_marked():
    model = build("lora")
    parallelize(model, activation_checkpointing=True)
    marked = [name for name, m in model.named_modules() if getattr(m, "skip_output_in_recompute", False)]
    assert marked == [f"layers.{i}.mlp.w2" for i in range(len(model.layers))]


def test_the_flag_is_up_only_inside_each_recompute_and_counts_nesting():
    seen = []

    def body(x):
        seen.append(is_recomputing())
        return x.sin()

    x = torch.randn(3, requires_grad=True)
    y = checkpoint(body, x, use_reentrant=False, context_fn=marked_recompute_contexts).sum()
    y.backward(retain_graph=True)
    y.backward()  # a second recompute enters the same context object again
    assert seen == [False, True, True] and not is_recomputing()
    with Recomputing():
        with Recomputing():
            assert is_recomputing()
        assert is_recomputing()
    assert not is_recomputing()


def test_an_unmarked_lora_layer_computes_its_output_in_a_recompute():
    """A layer whose output a recomputed op saves (here: a sigmoid after it) must not be skipped."""
    torch.manual_seed(0)
    layer = LoRALinear(8, 8, rank=2, alpha=4.0)
    torch.nn.init.normal_(layer.lora_b.weight)
    x = torch.randn(5, 8, requires_grad=True)

    def body(inp):
        return layer(inp).sigmoid()

    grads = []
    for wrap in (
        body,
        lambda inp: checkpoint(body, inp, use_reentrant=False, context_fn=marked_recompute_contexts),
    ):
        x.grad = layer.lora_a.weight.grad = None
        wrap(x).sum().backward()
        grads.append((x.grad.clone(), layer.lora_a.weight.grad.clone()))
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_compiled_blocks_get_no_recompute_context():
    """torch.compile traces only selective-checkpoint contexts: the marking one is eager-only."""
    assert CheckpointPlan().checkpoint_kwargs(eager=False) == {}
    assert CheckpointPlan().checkpoint_kwargs()["context_fn"] is marked_recompute_contexts
    assert (
        CheckpointPlan(keep_gemms=True).checkpoint_kwargs(eager=False)["context_fn"]
        is not marked_recompute_contexts
    )
