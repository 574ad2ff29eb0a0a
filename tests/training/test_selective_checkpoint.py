"""Selective activation checkpointing (`ac_mode: selective`), on CPU.

References: the same blocks without checkpointing (autograd's plain graph) and under full
checkpointing, fp32, seeded alike. That the `op` policy really keeps the GEMM outputs is checked by
counting the GEMMs the backward runs: the plain backward's plus the forward's (less each block's
closing projection's) under full checkpointing, exactly the plain backward's under `op`.
"""

from __future__ import annotations

import functools

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from ftcore.distributed.parallelize import parallelize, speed_options
from ftcore.models import init_weights
from ftcore.models.builders import lora_transformer_decoder, transformer_decoder
from ftcore.training import selective_checkpoint
from ftcore.training.selective_checkpoint import CheckpointPlan, checkpoint_plan
from tests.lora_setup import train_adapters_only
from tests.training.sac_before_op import create_contexts_before_op
from tests.training.test_activation_offload import (
    RUN_SMALL,
    _losses,
    block_inputs,
    blocks_loss_and_grads,
    run_command,
    two_process_losses,
)

SIZES = dict(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=64)
QLORA_SIZES = {**SIZES, "dim": 64, "hidden_dim": 128}
TIGHT = dict(rtol=1e-5, atol=1e-6)


def build(kind: str, dropout: float = 0.0) -> torch.nn.Module:
    """The same tiny Llama every call: full, LoRA (B non-zero, so a doubled adapter add would show) or
    QLoRA (NF4 base; the CPU reference kernels)."""
    torch.manual_seed(0)
    if kind == "full":
        model = transformer_decoder(**SIZES)
        init_weights(model)
        return model
    model = lora_transformer_decoder(
        ["q_proj", "k_proj", "v_proj", "output_proj"],
        apply_lora_to_mlp=True,
        lora_rank=4,
        lora_dropout=dropout,
        quantize_base=kind == "qlora",
        **(QLORA_SIZES if kind == "qlora" else SIZES),
    )
    init_weights(model)
    train_adapters_only(model, b_std=0.1)
    return model


class CountGemms(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in ("aten::mm", "aten::addmm", "aten::addmm_"):
            self.count += 1
        return func(*args, **(kwargs or {}))


def inputs_for(model):
    """block_inputs(), with a leaf input as wide as this model (the QLoRA one is wider: NF4 blocks of 64)."""
    x, pos, mask = block_inputs()
    width = model.tok_embeddings.embedding_dim
    x = torch.randn(*x.shape[:-1], width, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    return x, pos, mask


def checkpointed(kind: str, dropout: float = 0.0, **options):
    model = build(kind, dropout)
    parallelize(model, activation_checkpointing=bool(options), **options)
    return model


@pytest.fixture(params=["after-op", "before-op"])
def policy_order(request, monkeypatch):
    """Run the op policy in this torch's order and in the older one (sac_before_op)."""
    if request.param == "before-op":
        monkeypatch.setattr(
            selective_checkpoint, "create_selective_checkpoint_contexts", create_contexts_before_op
        )
    return request.param


@pytest.mark.parametrize("kind", ["full", "lora", "qlora"])
def test_op_policy_gives_the_plain_gradients(kind, policy_order):
    model = checkpointed(kind)
    ref = blocks_loss_and_grads(model, *inputs_for(model))
    model = checkpointed(kind, ac_mode="selective", ac_option="op")
    loss, grads, input_grad = blocks_loss_and_grads(model, *inputs_for(model))
    torch.testing.assert_close(loss, ref[0], **TIGHT)
    torch.testing.assert_close(input_grad, ref[2], **TIGHT)
    assert grads.keys() == ref[1].keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref[1][name], **TIGHT, msg=name)


def test_op_policy_with_lora_dropout_replays_the_masks(policy_order):
    """Dropout on: the unfused LoRA path (adapter added in place into the base output) and the RNG replay."""
    ref = blocks_loss_and_grads(checkpointed("lora", dropout=0.2), *block_inputs())
    loss, grads, input_grad = blocks_loss_and_grads(
        checkpointed("lora", dropout=0.2, ac_mode="selective", ac_option="op"), *block_inputs()
    )
    torch.testing.assert_close(input_grad, ref[2], **TIGHT)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref[1][name], **TIGHT, msg=name)


@pytest.mark.parametrize("kind", ["full", "lora", "qlora"])
def test_op_policy_reruns_no_forward_gemm_in_the_backward(kind, policy_order):
    counts = {}
    for name, options in (
        ("plain", {}),
        ("full", {"ac_mode": "full"}),
        ("op", {"ac_mode": "selective", "ac_option": "op"}),
    ):
        count = CountGemms()
        model = checkpointed(kind, **options)
        blocks_loss_and_grads(model, *inputs_for(model), backward_context=count)
        counts[name] = count.count
    forward = CountGemms()
    with forward, torch.no_grad():
        model = build(kind)
        x, pos, mask = inputs_for(model)
        h = x
        for layer in model.layers:
            h = layer(h, pos, mask, cache_pos=None)
    assert forward.count > 0
    # full checkpointing reruns the forward's GEMMs but each block's closing projection's, whose output
    # the rerun discards: torch stops the rerun before a plain linear's GEMM, and LoRA's one-node matmul
    # leaves out its base and adapter-B GEMMs (ftcore.modules.recompute); the op policy reruns none
    skipped_per_block = 1 if kind == "full" else 2
    assert counts["full"] - counts["plain"] == forward.count - skipped_per_block * len(model.layers)
    assert counts["op"] == counts["plain"]


def test_every_kth_block_is_checkpointed_and_the_gradients_match():
    model = checkpointed("lora", ac_mode="selective", ac_option=2)
    wrapped = [isinstance(block.forward, functools.partial) for block in model.layers]
    assert wrapped == [True, False, True]
    ref = blocks_loss_and_grads(checkpointed("lora"), *block_inputs())
    _, grads, input_grad = blocks_loss_and_grads(model, *block_inputs())
    torch.testing.assert_close(input_grad, ref[2], **TIGHT)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref[1][name], **TIGHT, msg=name)


def test_the_plan_names_the_blocks_to_checkpoint():
    assert CheckpointPlan().blocks(5) == [0, 1, 2, 3, 4]
    assert CheckpointPlan(keep_gemms=True).blocks(5) == [0, 1, 2, 3, 4]
    assert CheckpointPlan(every=2).blocks(5) == [0, 2, 4]
    assert CheckpointPlan(every=9).blocks(5) == [0]
    assert CheckpointPlan(skip_last=2).blocks(5) == [0, 1, 2]
    assert CheckpointPlan(every=2, skip_last=1).blocks(5) == [0, 2]
    assert CheckpointPlan(skip_last=4, keep_gemms=True).blocks(5) == [0]
    for skip in (5, 6):
        with pytest.raises(
            ValueError, match=f"ac_skip_last_blocks: {skip} leaves none of the model's 5 blocks"
        ):
            CheckpointPlan(skip_last=skip).blocks(5)


def test_the_config_settings_become_one_plan():
    assert checkpoint_plan(False, None, None) is None
    assert checkpoint_plan(True, None, None) == CheckpointPlan()
    assert checkpoint_plan(True, "full", None, skip_last_blocks=4) == CheckpointPlan(skip_last=4)
    assert checkpoint_plan(True, "selective", "op") == CheckpointPlan(keep_gemms=True)
    assert checkpoint_plan(True, "selective", 3, False, 512) == CheckpointPlan(every=3)
    assert checkpoint_plan(False, None, None, False, None, 0) is None


def test_every_kth_block_and_skip_last_combine():
    model = checkpointed("lora", ac_mode="selective", ac_option=2, ac_skip_last_blocks=1)
    assert [isinstance(block.forward, functools.partial) for block in model.layers] == [True, False, False]


def test_the_op_policy_refuses_dora():
    model = lora_transformer_decoder(["q_proj"], lora_rank=4, use_dora=True, **SIZES)
    with pytest.raises(ValueError, match="ac_option: op does not support DoRA"):
        parallelize(model, activation_checkpointing=True, ac_mode="selective", ac_option="op")
    cfg = {"enable_activation_checkpointing": True, "ac_mode": "selective", "ac_option": "op"}
    with pytest.raises(ValueError, match="ac_option: op does not support DoRA"):
        speed_options(OmegaConf.create({**cfg, "model": {"use_dora": True}}))
    parallelize(model, activation_checkpointing=True, ac_mode="selective", ac_option=2)  # K: fine


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_the_last_blocks_can_be_left_unchecked_with_the_same_gradients(kind):
    model = checkpointed(kind, ac_skip_last_blocks=1)
    assert [isinstance(block.forward, functools.partial) for block in model.layers] == [True, True, False]
    ref = blocks_loss_and_grads(checkpointed(kind), *block_inputs())
    _, grads, input_grad = blocks_loss_and_grads(model, *block_inputs())
    torch.testing.assert_close(input_grad, ref[2], **TIGHT)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref[1][name], **TIGHT, msg=name)


@pytest.mark.parametrize(
    "settings, words",
    [
        ((True, "partial", None), "ac_mode: 'partial'"),
        ((True, None, "op"), "ac_option: 'op' applies to ac_mode: selective"),
        ((False, "selective", "op"), "needs enable_activation_checkpointing: true"),
        ((True, "selective", None), "ac_option: null is not valid"),
        ((True, "selective", 0), "ac_option: 0 is not valid"),
        ((True, "selective", True), "ac_option: True is not valid"),
        ((True, "selective", "ops"), "ac_option: 'ops' is not valid"),
        ((True, "selective", "op", True), "enable_activation_offloading"),
        ((True, "selective", "op", False, 512), "mlp_chunk_tokens"),
        ((True, None, None, False, None, -1), "ac_skip_last_blocks: -1 must be an integer >= 0"),
        ((True, None, None, False, None, True), "ac_skip_last_blocks: True must be an integer >= 0"),
        ((False, None, None, False, None, 2), "ac_skip_last_blocks needs enable_activation_checkpointing"),
        (
            (True, None, None, True, None, 2),
            "ac_skip_last_blocks cannot be combined with enable_activation_offloading",
        ),
    ],
)
def test_bad_settings_are_refused_naming_the_key(settings, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        checkpoint_plan(*settings)


def test_speed_options_reads_and_checks_the_keys():
    cfg = OmegaConf.create({"enable_activation_checkpointing": True, "ac_mode": "selective", "ac_option": 2})
    options = speed_options(cfg)
    assert (options["ac_mode"], options["ac_option"]) == ("selective", 2)
    with pytest.raises(ValueError, match="ac_mode: selective needs"):
        speed_options(OmegaConf.create({"ac_mode": "selective", "ac_option": "op"}))


def test_ftcore_run_with_the_op_policy_matches_full_checkpointing(tmp_path):
    common = [*RUN_SMALL, "batch_size=4", "enable_activation_checkpointing=true"]
    run_command(*common, f"output_dir={tmp_path / 'full'}")
    run_command(*common, "ac_mode=selective", "ac_option=op", f"output_dir={tmp_path / 'op'}")
    full, op = _losses(tmp_path / "full"), _losses(tmp_path / "op")
    assert sorted(full) == [1, 2, 3]
    assert op == pytest.approx(full, abs=1e-5)


def test_two_processes_with_the_op_policy_match_full_checkpointing(tmp_path):
    """Under torchrun (FSDP2, gloo on CPU): the blocks' parameters are all-gathered around the kept
    GEMMs; LoRA dropout on (the unfused adapter path and the RNG replay)."""
    op = ["ac_mode=selective", "ac_option=op", "ac_skip_last_blocks=1"]
    losses = two_process_losses(tmp_path, {"full": [], "op": op})
    assert sorted(losses["full"]) == [1, 2, 3]
    assert losses["op"] == pytest.approx(losses["full"], abs=1e-6)


def test_the_policy_finds_kept_outputs_when_consulted_before_the_op_and_replays_in_the_recompute():
    """Torch versions that call the policy before each op (and again in the recompute): the in-place
    decision comes from the kept outputs already stored, and the recompute repeats it."""
    from types import SimpleNamespace

    from torch.utils.checkpoint import CheckpointPolicy

    from ftcore.training.selective_checkpoint import SaveMatmulsPolicy

    kept_output, fresh = torch.zeros(4, 4), torch.zeros(4, 4)
    policy = SaveMatmulsPolicy()
    policy.watch({"aten::mm": [SimpleNamespace(val=kept_output.detach())]})
    forward, recompute = SimpleNamespace(is_recompute=False), SimpleNamespace(is_recompute=True)
    addmm_ = torch.ops.aten.addmm_.default
    assert policy(forward, torch.ops.aten.mm.default, fresh, fresh) == CheckpointPolicy.MUST_SAVE
    assert policy(forward, addmm_, kept_output, fresh, fresh) == CheckpointPolicy.MUST_SAVE
    assert policy(forward, addmm_, fresh, fresh, fresh) == CheckpointPolicy.PREFER_RECOMPUTE
    # `out=` writes count as in-place: into a kept tensor it is kept; a GEMM's out= variant is no kept GEMM
    mul_out = torch.ops.aten.mul.out
    assert policy(forward, mul_out, fresh, fresh, out=kept_output[1:]) == CheckpointPolicy.MUST_SAVE
    assert (
        policy(forward, torch.ops.aten.mm.out, fresh, fresh, out=fresh) == CheckpointPolicy.PREFER_RECOMPUTE
    )
    # in the recompute the tensors are new ones: the forward's decisions are replayed in order
    assert policy(recompute, addmm_, fresh, fresh, fresh) == CheckpointPolicy.MUST_SAVE
    assert policy(recompute, addmm_, fresh, fresh, fresh) == CheckpointPolicy.PREFER_RECOMPUTE
    assert policy(recompute, mul_out, fresh, fresh, out=fresh) == CheckpointPolicy.MUST_SAVE
    assert (
        policy(recompute, torch.ops.aten.mm.out, fresh, fresh, out=fresh) == CheckpointPolicy.PREFER_RECOMPUTE
    )
    # a recomputed op that reads the kept output before an in-place change of it: refused
    reader = SaveMatmulsPolicy()
    reader.watch({"aten::mm": [SimpleNamespace(val=kept_output.detach())]})
    assert reader(forward, torch.ops.aten.add.Tensor, kept_output, fresh) == CheckpointPolicy.PREFER_RECOMPUTE
    with pytest.raises(RuntimeError, match="after a recomputed op read it"):
        reader(forward, addmm_, kept_output, fresh, fresh)


def _reads_then_changes_in_place(x, w):
    y = x @ w
    z = torch.sigmoid(y)  # a recomputed op computes from the kept GEMM output ...
    y.add_(1)  # ... which then changes in place: the recompute would hand sigmoid the changed value
    return (z * y).sum()


def _views_then_changes_in_place(x, w):
    y = x @ w
    flat = y.view(-1)  # a view follows the kept tensor's final state in forward and recompute alike
    y.add_(1)
    return (flat * 2).sum() + torch.tanh(y).sum()


def test_a_read_before_an_in_place_change_of_a_kept_output_is_refused(policy_order):
    from torch.utils.checkpoint import checkpoint

    from ftcore.training.selective_checkpoint import save_matmuls_context

    x, w = torch.randn(4, 4, requires_grad=True), torch.randn(4, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="`aten::add_` changes a kept GEMM or attention output in place"):
        checkpoint(_reads_then_changes_in_place, x, w, use_reentrant=False, context_fn=save_matmuls_context)
    reference = torch.autograd.grad(_views_then_changes_in_place(x, w), (x, w))
    out = checkpoint(_views_then_changes_in_place, x, w, use_reentrant=False, context_fn=save_matmuls_context)
    for grad, expected in zip(torch.autograd.grad(out, (x, w)), reference):
        torch.testing.assert_close(grad, expected, **TIGHT)
