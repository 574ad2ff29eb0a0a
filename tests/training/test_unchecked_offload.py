"""`ac_offload_blocks`: blocks run unchecked with their saved activations in host memory, on CPU (where
the "host copy" is an ordinary copy, so the copy, restore and prefetch code runs as on CUDA).

References: the same model unchecked (autograd's plain graph) and fully checkpointed, with the RNG
seeded alike (dropout draws the same masks); fp32, and equality is exact: an offloaded block runs the
same ops on exact copies. The tiny model's storages are all under `MIN_OFFLOAD_BYTES`, so the tests
lower it to 0 (every saved activation copied), except where the threshold itself is tested.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from omegaconf import OmegaConf

from ftcore.distributed.parallelize import parallelize, speed_options
from ftcore.training import unchecked_offload
from ftcore.training.selective_checkpoint import checkpoint_plan
from ftcore.training.unchecked_offload import (
    BlockActivations,
    HostCopies,
    offloaded_blocks,
    offloaded_unchecked_forward,
)
from tests.training.test_activation_offload import (
    RUN_SMALL,
    SIZES,
    _losses,
    block_inputs,
    blocks_loss_and_grads,
    build,
)

EXACT = dict(rtol=0, atol=0)


@pytest.fixture(autouse=True)
def copy_every_storage(monkeypatch):
    monkeypatch.setattr(unchecked_offload, "MIN_OFFLOAD_BYTES", 0)


class CopyCounter:
    """Counts, per offloaded block forward, the storages copied to the host and the tensors left alone."""

    def __init__(self, monkeypatch):
        self.copied: list[int] = []
        self.kept = 0
        pack = BlockActivations.pack

        def counting_pack(activations, tensor):
            handle = pack(activations, tensor)
            self.kept += handle is tensor
            return handle

        finish = BlockActivations.finish_forward

        def counting_finish(activations):
            self.copied.append(len(activations.host))
            finish(activations)

        monkeypatch.setattr(BlockActivations, "pack", counting_pack)
        monkeypatch.setattr(BlockActivations, "finish_forward", counting_finish)


@pytest.mark.parametrize("kind", ["lora", "full"])
@pytest.mark.parametrize("offload, skip_last", [(1, 0), (2, 0), (3, 0), (1, 1)])
def test_offloaded_blocks_give_the_plain_gradients(kind, offload, skip_last, monkeypatch):
    counter = CopyCounter(monkeypatch)
    results = {}
    for mode in ("plain", "offload"):
        model = build(kind)
        if mode == "offload":
            parallelize(
                model, activation_checkpointing=True, ac_offload_blocks=offload, ac_skip_last_blocks=skip_last
            )
        results[mode] = blocks_loss_and_grads(model, *block_inputs())
    assert len(counter.copied) == offload and min(counter.copied) > 0
    (ref_loss, ref_grads, ref_input_grad), (loss, grads, input_grad) = results["plain"], results["offload"]
    torch.testing.assert_close(loss, ref_loss, **EXACT)
    torch.testing.assert_close(input_grad, ref_input_grad, **EXACT)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], **EXACT, msg=name)


def test_each_storage_is_copied_once_and_weights_and_shared_inputs_never(monkeypatch):
    """q, k and v all save the same normed input, and views of one storage share its copy; the block's
    parameters (saved by every matmul) and the mask and positions (shared by all blocks) stay."""
    model = build("lora")
    parallelize(model, activation_checkpointing=True, ac_offload_blocks=1)
    block = model.layers[0]
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
    x, pos, mask = block_inputs()
    packed = []
    pack = BlockActivations.pack

    def recording_pack(activations, tensor):
        handle = pack(activations, tensor)
        packed.append((tensor.untyped_storage().data_ptr(), handle is tensor))
        return handle

    monkeypatch.setattr(BlockActivations, "pack", recording_pack)
    activations = []
    monkeypatch.setattr(BlockActivations, "finish_forward", lambda self: activations.append(len(self.host)))
    block(x * 1.0, pos, mask)
    copied = {ptr for ptr, kept in packed if not kept}
    assert activations == [len(copied)] and len(copied) < sum(not kept for _, kept in packed)  # some shared
    assert not copied & (weights | {mask.untyped_storage().data_ptr(), pos.untyped_storage().data_ptr()})
    assert all(kept for ptr, kept in packed if ptr in weights)


def record_block_activations(monkeypatch):
    """Every BlockActivations made from now on, in order of creation."""
    records = []
    init = BlockActivations.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        records.append(self)

    monkeypatch.setattr(BlockActivations, "__init__", recording_init)
    return records


def test_small_storages_stay_where_they_are(monkeypatch):
    monkeypatch.setattr(unchecked_offload, "MIN_OFFLOAD_BYTES", 1 << 20)  # the tiny model's are all smaller
    counter = CopyCounter(monkeypatch)
    model = build("lora")
    parallelize(model, activation_checkpointing=True, ac_offload_blocks=3)
    blocks_loss_and_grads(model, *block_inputs())
    assert counter.copied == [0, 0, 0] and counter.kept > 0


def test_the_next_blocks_backward_brings_the_offloaded_block_back_before_its_own(monkeypatch):
    model = build("lora")
    parallelize(
        model, activation_checkpointing=True, ac_offload_blocks=1
    )  # block 0, then 1 and 2 checkpointed
    records = record_block_activations(monkeypatch)
    restored_when_block_0_starts = []
    unpack = BlockActivations.unpack

    def watching_unpack(self, handle):
        if not self.in_backward:
            restored_when_block_0_starts.append(self.restored is not None)
        return unpack(self, handle)

    monkeypatch.setattr(BlockActivations, "unpack", watching_unpack)
    blocks_loss_and_grads(model, *block_inputs())
    assert len(records) == 1 and restored_when_block_0_starts == [True]  # prefetched by block 1's hook


def test_a_second_backward_over_a_retained_graph_reads_the_same_copies():
    model = build("lora", dropout=0.0)
    parallelize(model, activation_checkpointing=True, ac_offload_blocks=2)
    x, pos, mask = block_inputs()
    h = x
    for layer in model.layers:
        h = layer(h, pos, mask)
    h.square().mean().backward(retain_graph=True)
    first = x.grad.clone()
    x.grad = None
    h.square().mean().backward()
    torch.testing.assert_close(x.grad, first, **EXACT)


def test_host_copies_are_freed_by_the_backward(monkeypatch):
    model = build("lora")
    parallelize(model, activation_checkpointing=True, ac_offload_blocks=1)
    records = []
    init = BlockActivations.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        records.append(weakref.ref(self))

    monkeypatch.setattr(BlockActivations, "__init__", recording_init)
    out = model(torch.randint(0, SIZES["vocab_size"], (2, 13)))
    assert records[0]() is not None and records[0]().host
    out.square().mean().backward()
    gc.collect()
    assert records[0]() is None  # freed with the block's graph, although `out` is still alive


def test_an_in_place_change_of_a_saved_tensor_is_refused():
    """Autograd would catch it at the backward; the copy may already have read either value, so the
    block's end must."""

    def changes_a_saved_tensor(x):
        y = torch.sigmoid(x)  # saves its output
        return y.mul_(2.0)

    x = torch.randn(4, 4, requires_grad=True)
    with pytest.raises(
        RuntimeError, match="ac_offload_blocks: a tensor saved for the backward.*changed in place"
    ):
        offloaded_unchecked_forward(changes_a_saved_tensor, torch.nn.Module(), HostCopies(), None, 0, x)


def test_ftcore_run_with_offloaded_blocks_matches_the_plain_run(tmp_path):
    """The recipe path, in this process so the copy threshold stays lowered: the config key reaches
    the model, and training with LoRA dropout gives the plain run's losses."""
    from ftcore.cli.main import main

    common = [*RUN_SMALL, "batch_size=4", "model.lora_dropout=0.1"]
    offloaded = ["enable_activation_checkpointing=true", "ac_offload_blocks=1"]
    for name, extra in (("plain", []), ("offloaded", offloaded)):
        assert main(["run", *common, f"output_dir={tmp_path / name}", *extra]) == 0
    plain, switched = _losses(tmp_path / "plain"), _losses(tmp_path / "offloaded")
    assert sorted(plain) == [1, 2, 3]
    assert switched == pytest.approx(plain, abs=1e-6)


def test_eval_under_no_grad_copies_nothing(monkeypatch):
    counter = CopyCounter(monkeypatch)
    tokens = torch.randint(0, SIZES["vocab_size"], (2, 13))
    reference = build("lora").eval()
    model = build("lora").eval()
    parallelize(model, activation_checkpointing=True, ac_offload_blocks=2)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), **EXACT)
    assert counter.copied == []


def test_the_offloaded_blocks_are_spread_over_the_checkpointed_ones():
    assert offloaded_blocks(list(range(80)), 40) == list(range(0, 80, 2))
    assert offloaded_blocks(list(range(10)), 3) == [0, 3, 6]
    plan = checkpoint_plan(True, None, None, skip_last_blocks=2, offload_blocks=3)
    assert plan is not None and plan.offloaded(8) == [0, 2, 4]
    assert plan.blocks(8) == [1, 3, 5]  # the rest of the first 6 checkpointed; blocks 6 and 7 unchecked
    with pytest.raises(
        ValueError, match="ac_offload_blocks: 7 is more than the 6 blocks checkpointing would rerun"
    ):
        checkpoint_plan(True, None, None, skip_last_blocks=2, offload_blocks=7).blocks(8)


@pytest.mark.parametrize(
    "keys, words",
    [
        ({"ac_offload_blocks": 2}, "ac_offload_blocks needs enable_activation_checkpointing: true"),
        ({"enable_activation_checkpointing": True, "ac_offload_blocks": -1}, "must be an integer >= 0"),
        ({"enable_activation_checkpointing": True, "ac_offload_blocks": "4"}, "must be an integer >= 0"),
        (
            {
                "enable_activation_checkpointing": True,
                "enable_activation_offloading": True,
                "ac_offload_blocks": 2,
            },
            "cannot be combined with enable_activation_offloading",
        ),
        (
            {"enable_activation_checkpointing": True, "compile": True, "ac_offload_blocks": 2},
            "cannot be combined with compile: true",
        ),
    ],
)
def test_bad_settings_are_refused_naming_the_key(keys, words):
    with pytest.raises(ValueError, match=words):
        speed_options(OmegaConf.create(keys))


def test_cuda_graphs_refuse_offloaded_blocks():
    from ftcore.training.cuda_graphs import check_cuda_graphs

    with pytest.raises(ValueError, match="cuda_graphs: true cannot capture ac_offload_blocks"):
        check_cuda_graphs(
            torch.device("cuda"),
            compile=False,
            activation_offloading=False,
            sharded=False,
            optimizer_in_backward=False,
            offloaded_blocks=True,
        )


def _offloaded(fn, x):
    return offloaded_unchecked_forward(fn, torch.nn.Module(), HostCopies(), None, 0, x)


def test_views_of_one_storage_in_two_dtypes_are_two_copies():
    """A small fp32 view and a small bf16 view at the same element offset are different bytes."""
    w = torch.randn(10, requires_grad=True)
    w16 = torch.randn(10, dtype=torch.bfloat16, requires_grad=True)

    def block(base):
        base = base.detach()
        a, b = base[10:20], base.view(torch.bfloat16)[10:20]  # mul saves both small views
        return (a * w).sum() + (b * w16).float().sum()

    base = torch.randn(1000)
    grads = []
    for run in (block, lambda x: _offloaded(block, x)):
        w.grad = w16.grad = None
        run(base).backward()
        grads.append((w.grad.clone(), w16.grad.clone()))
    for reference, offloaded in zip(*grads, strict=True):
        torch.testing.assert_close(offloaded, reference, **EXACT)


def test_an_in_place_change_after_the_block_returned_is_refused_at_the_backward():
    x = torch.randn(4, 4, requires_grad=True)
    y = _offloaded(torch.sigmoid, x)  # sigmoid saves its output
    y.mul_(2.0)
    with pytest.raises(
        RuntimeError, match="changed in place after the block returned.*ac_offload_blocks: null"
    ):
        y.sum().backward()


def test_storages_no_saved_tensor_needs_are_not_brought_back(monkeypatch):
    """A graph dropped inside the block (a detached result) leaves its copy unread: not restored."""
    records = record_block_activations(monkeypatch)
    x = torch.randn(4, 4, requires_grad=True)
    out = _offloaded(lambda t: torch.sigmoid(t * 3.0).detach() + t.exp(), x)
    gc.collect()
    out.sum().backward()
    (record,) = records
    assert len(record.host) == 2 and sum(data is None for data in record.restored) == 1
    torch.testing.assert_close(x.grad, x.detach().exp(), **EXACT)


def test_an_in_place_change_of_a_saved_views_base_after_the_block_returned_is_refused():
    """The saved tensor is a temporary view (`b.view(-1)`), gone after the block; its base `b` is
    returned and changed in place. Plain autograd refuses this (the view shares b's version counter)."""
    w = torch.randn(16, requires_grad=True)

    def block(x):
        b = x * 2.0
        return b, b.view(-1) * w  # the product saves the view

    for run in (block, lambda x: _offloaded(block, x)):
        b, product = run(torch.randn(4, 4, requires_grad=True))
        b.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation|after the block returned"):
            product.sum().backward()


def test_a_forward_that_stopped_early_leaves_no_stale_prefetch(monkeypatch):
    """Two forwards of an offloaded block without a backward between them (the first abandoned): the
    prefetching block brings back only the second's activations."""
    records = record_block_activations(monkeypatch)
    chain = HostCopies()
    for _ in range(2):
        offloaded_unchecked_forward(
            torch.sigmoid, torch.nn.Module(), chain, 5, 0, torch.randn(4, requires_grad=True)
        )
    assert list(chain.prefetch_at) == [5] and chain.prefetch_at[5]() is records[1]


def test_block_activations_that_failed_to_build_are_collected_quietly(monkeypatch):
    unraisable = []
    monkeypatch.setattr("sys.unraisablehook", unraisable.append)
    with pytest.raises(AttributeError):
        BlockActivations(torch.nn.Module(), (), None, torch.device("cpu"), 0)  # type: ignore[arg-type]
    gc.collect()
    assert unraisable == []
