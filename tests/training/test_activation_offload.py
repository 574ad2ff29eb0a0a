"""Activation offloading and the sequence-chunked MLP, on CPU (where the offload is an ordinary copy).

References: the same blocks run without checkpointing (autograd's plain graph) and under
`torch.utils.checkpoint` (non-reentrant), with the RNG seeded the same way for each run, so dropout
draws the same masks; fp32, tight tolerance. The end-to-end test compares `ftcore run` with both
switches on against the same run without them.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import socket
import subprocess
import weakref

import pytest
import torch
from omegaconf import OmegaConf

from ftcore.distributed.parallelize import parallelize, speed_options
from ftcore.models import init_weights
from ftcore.models.builders import lora_transformer_decoder, transformer_decoder
from ftcore.training import activation_offload
from ftcore.training.activation_offload import OffloadChain
from ftcore.training.chunked_mlp import chunked_mlp_forward
from tests.lora_setup import train_adapters_only
from tests.recipes.helpers import ftcore_run_command

SIZES = dict(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=64)
BATCH, SEQ = 2, 13  # 26 tokens: chunks of 7 leave a remainder
TIGHT = dict(rtol=1e-6, atol=1e-7)


def build(kind: str, dropout: float = 0.2, dtype=torch.float32) -> torch.nn.Module:
    """The same tiny Llama every call: LoRA (adapters trainable, B non-zero so they matter) or full."""
    torch.manual_seed(0)
    if kind == "full":
        model = transformer_decoder(**SIZES)
        init_weights(model)
        return model.to(dtype)
    model = lora_transformer_decoder(
        ["q_proj", "v_proj", "output_proj"],
        apply_lora_to_mlp=True,
        lora_rank=4,
        lora_dropout=dropout,
        **SIZES,
    )
    init_weights(model)
    train_adapters_only(model, b_std=0.1)
    return model.to(dtype)


def block_inputs(dtype=torch.float32):
    """A leaf input (the gradient target), positions restarting mid-row and a packed-style bool mask."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, SEQ, SIZES["dim"], generator=g, dtype=dtype).requires_grad_(True)
    pos = torch.cat([torch.arange(6), torch.arange(SEQ - 6)])[None].expand(BATCH, -1)
    document = (torch.arange(SEQ) >= 6).long()
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    mask = (causal & (document[:, None] == document[None, :]))[None].expand(BATCH, -1, -1)
    return x, pos, mask


def blocks_loss_and_grads(model, x, pos, mask, backward_context=None):
    """Run the blocks directly (extra tensor args positional, `cache_pos` as a keyword), backprop
    (inside `backward_context` when given, e.g. a dispatch mode that counts the backward's ops)."""
    torch.manual_seed(123)  # the dropout masks
    h = x
    for layer in model.layers:
        h = layer(h, pos, mask, cache_pos=None)
    loss = h.square().mean()
    with backward_context or contextlib.nullcontext():
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, x.grad.clone()


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_offloading_matches_checkpointing_and_no_checkpointing(kind):
    results = {}
    for mode in ("plain", "checkpoint", "offload"):
        model = build(kind)
        parallelize(model, activation_checkpointing=mode != "plain", activation_offloading=mode == "offload")
        results[mode] = blocks_loss_and_grads(model, *block_inputs())
        assert len(results[mode][1]) == sum(p.requires_grad for p in model.layers.parameters())
    ref_loss, ref_grads, ref_input_grad = results["plain"]
    for mode in ("checkpoint", "offload"):
        loss, grads, input_grad = results[mode]
        torch.testing.assert_close(loss, ref_loss, **TIGHT)
        torch.testing.assert_close(input_grad, ref_input_grad, **TIGHT)
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], **TIGHT, msg=f"{mode}: {name}")


def test_offloading_in_many_host_pieces_gives_the_same_gradients(monkeypatch):
    """Tiny piece bounds, so each block input is split into several host pieces and rebuilt from them."""
    monkeypatch.setattr(activation_offload, "MAX_PIECE_BYTES", 256)
    monkeypatch.setattr(activation_offload, "MIN_PIECE_BYTES", 16)
    assert len(activation_offload.piece_numels(BATCH * SEQ * SIZES["dim"], 4)) > 10
    results = []
    for offloading in (False, True):
        model = build("lora")
        parallelize(model, activation_checkpointing=True, activation_offloading=offloading)
        results.append(blocks_loss_and_grads(model, *block_inputs()))
    (ref_loss, ref_grads, ref_input_grad), (loss, grads, input_grad) = results
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    torch.testing.assert_close(input_grad, ref_input_grad, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("numel", [1, 7, 4096 * 1000, 342_000 * 4096, 2**30])
def test_host_pieces_are_powers_of_two_so_pinning_wastes_little(numel):
    """torch's pinned allocator rounds each allocation up to a power of two: the pieces lose < 1 MiB."""
    pieces = activation_offload.piece_numels(numel, 2)
    assert sum(pieces) == numel
    pinned = sum(1 << (2 * n - 1).bit_length() for n in pieces)  # next power of two >= each piece's bytes
    assert pinned - 2 * numel < activation_offload.MIN_PIECE_BYTES
    assert max(2 * n for n in pieces) <= activation_offload.MAX_PIECE_BYTES


def test_dropout_really_draws_masks_so_the_rng_replay_is_tested():
    _, pos, mask = block_inputs()
    losses = []
    for seed in (1, 2):
        model = build("lora", dropout=0.5)
        torch.manual_seed(seed)
        losses.append(model.layers[0](block_inputs()[0], pos, mask).square().mean())
    assert not torch.allclose(losses[0], losses[1])


@pytest.mark.parametrize("offloading", [True, False])
def test_the_block_input_is_released_after_forward_only_when_offloading(offloading):
    model = build("lora")
    parallelize(model, activation_checkpointing=True, activation_offloading=offloading)
    leaf, pos, mask = block_inputs()
    x = leaf * 1.0  # a non-leaf, like a previous block's output (a leaf is held by its grad accumulator)
    alive = weakref.ref(x)
    out = model.layers[0](x, pos, mask)
    del x
    gc.collect()
    assert (alive() is None) == offloading  # plain checkpointing keeps it for the recompute
    out.square().mean().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


def test_host_copies_are_freed_by_the_backward():
    model = build("lora")
    parallelize(model, activation_checkpointing=True, activation_offloading=True)
    chain: OffloadChain = model.layers[0].forward.args[1]
    out = model(torch.randint(0, SIZES["vocab_size"], (BATCH, SEQ)))
    newest = chain.newest
    assert newest() is not None and newest().host is not None
    out.square().mean().backward()
    gc.collect()
    assert newest() is None  # freed with the block's saved state although `out` is still alive


def test_eval_under_no_grad_just_runs_the_blocks():
    tokens = torch.randint(0, SIZES["vocab_size"], (BATCH, SEQ))
    reference = build("lora").eval()
    model = build("lora").eval()
    parallelize(model, activation_checkpointing=True, activation_offloading=True, mlp_chunk_tokens=7)
    chain: OffloadChain = model.layers[0].forward.args[1]
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), rtol=1e-5, atol=1e-6)
    assert chain.newest is None  # nothing was offloaded


def test_offloading_needs_activation_checkpointing():
    with pytest.raises(ValueError, match="enable_activation_offloading.*enable_activation_checkpointing"):
        parallelize(build("lora"), activation_offloading=True)
    cfg = OmegaConf.create({"enable_activation_offloading": True, "enable_activation_checkpointing": False})
    with pytest.raises(ValueError, match="enable_activation_checkpointing: true"):
        parallelize(build("lora"), **speed_options(cfg))


@pytest.mark.parametrize("bad", [0, -3, True, 2.5])
def test_mlp_chunk_tokens_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="`mlp_chunk_tokens` must be an integer >= 1"):
        parallelize(build("lora"), mlp_chunk_tokens=bad)


def test_speed_options_reads_both_keys():
    cfg = OmegaConf.create(
        {
            "enable_activation_checkpointing": True,
            "enable_activation_offloading": True,
            "mlp_chunk_tokens": 512,
        }
    )
    options = speed_options(cfg)
    assert options["activation_offloading"] is True and options["mlp_chunk_tokens"] == 512
    empty = speed_options(OmegaConf.create({}))
    assert empty["activation_offloading"] is False and empty["mlp_chunk_tokens"] is None


@pytest.mark.parametrize("checkpointing", ["none", "checkpoint", "offload"])
def test_chunked_mlp_matches_the_unchunked_model(checkpointing):
    """Chunks of 7 over 26 tokens, float64, no dropout (chunks draw their own masks)."""
    results = []
    for chunk in (None, 7):
        model = build("lora", dropout=0.0, dtype=torch.float64)
        parallelize(
            model,
            activation_checkpointing=checkpointing != "none",
            activation_offloading=checkpointing == "offload",
            mlp_chunk_tokens=chunk,
        )
        results.append(blocks_loss_and_grads(model, *block_inputs(torch.float64)))
    (ref_loss, ref_grads, ref_input_grad), (loss, grads, input_grad) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(input_grad, ref_input_grad, rtol=1e-12, atol=1e-14)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-12, atol=1e-14, msg=name)


def test_chunked_mlp_with_dropout_replays_its_masks_under_offloading():
    """The chunks' own checkpoints, nested in the block's, restore the RNG for each recompute."""
    results = []
    for offloading in (False, True):
        model = build("lora", dropout=0.3)
        parallelize(
            model, activation_checkpointing=offloading, activation_offloading=offloading, mlp_chunk_tokens=7
        )
        results.append(blocks_loss_and_grads(model, *block_inputs()))
    (ref_loss, ref_grads, ref_input_grad), (loss, grads, input_grad) = results
    torch.testing.assert_close(loss, ref_loss, **TIGHT)
    torch.testing.assert_close(input_grad, ref_input_grad, **TIGHT)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], **TIGHT, msg=name)


def test_chunked_mlp_saves_no_hidden_width_activation():
    """Under grad only the chunks' inputs are saved: no (tokens, hidden_dim) tensor survives the forward."""
    model = build("lora", dropout=0.0)
    mlp = model.layers[0].mlp
    x = torch.randn(BATCH, SEQ, SIZES["dim"], requires_grad=True)
    saved_widths = {}
    for chunk in (None, 7):
        widths = []

        def pack(t, widths=widths):
            widths.append(t.shape[-1])
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = mlp(x) if chunk is None else chunked_mlp_forward(mlp.forward, chunk, x)
        assert out.shape == (BATCH, SEQ, SIZES["dim"])
        saved_widths[chunk] = set(widths)
    assert SIZES["hidden_dim"] in saved_widths[None]  # the reference does save them
    assert SIZES["hidden_dim"] not in saved_widths[7]


RUN_SMALL = [
    "lora_finetune", "--config", "demo/reverse_lora", "dataset.source.num_rows=64",
    "dataset_val.source.num_rows=16", "evaluators.0.max_rows=4", "max_steps=3",
    "lr_scheduler.num_warmup_steps=1", "log_every_n_steps=1", "save_every_n_steps=null",
    "eval_every_n_steps=null", "plot_loss_curve=false", "shuffle=false",
]  # fmt: skip


def run_command(*args: str) -> None:
    """`ftcore run ARGS...` in a subprocess, as a user types it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(ftcore_run_command(*args), capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _losses(output_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def test_ftcore_run_with_offloading_and_chunked_mlp_matches_the_plain_run(tmp_path):
    switches = [
        "enable_activation_checkpointing=true",
        "enable_activation_offloading=true",
        "mlp_chunk_tokens=5",
    ]
    for name, extra in (("plain", []), ("switched", switches)):
        run_command(*RUN_SMALL, "batch_size=4", f"output_dir={tmp_path / name}", *extra)
    plain, switched = _losses(tmp_path / "plain"), _losses(tmp_path / "switched")
    assert sorted(plain) == [1, 2, 3]
    assert switched == pytest.approx(plain, abs=1e-5)


def two_process_losses(tmp_path, variants: dict[str, list[str]]) -> dict[str, dict[int, float]]:
    """The logged losses of `ftcore run --nproc_per_node 2` (FSDP2, gloo on CPU) of the small LoRA
    run with dropout and checkpointing on, once per variant's extra overrides."""
    common = [*RUN_SMALL, "model.lora_dropout=0.1", "enable_activation_checkpointing=true", "batch_size=2"]
    losses = {}
    for name, extra in variants.items():
        out = tmp_path / name
        run_command(
            "--nproc_per_node", "2", "--master_port", str(_free_port()), *common, f"output_dir={out}", *extra
        )
        losses[name] = _losses(out)
    return losses


def test_two_processes_with_offloading_match_plain_checkpointing(tmp_path):
    """Under torchrun (FSDP2, gloo on CPU) each rank offloads its own block inputs; dropout on."""
    losses = two_process_losses(
        tmp_path, {"checkpoint": [], "offload": ["enable_activation_offloading=true"]}
    )
    assert sorted(losses["checkpoint"]) == [1, 2, 3]
    assert losses["offload"] == pytest.approx(losses["checkpoint"], abs=1e-6)


@pytest.mark.slow
def test_offloading_wraps_a_compiled_block():
    """Compile traces the block alone; offloading stays eager around it (CPU inductor: minutes)."""
    results = []
    for mode in ("plain", "offload"):
        model = build("lora", dropout=0.0)
        parallelize(model, activation_checkpointing=mode == "offload", activation_offloading=mode == "offload",
                    compile=mode == "offload", mlp_chunk_tokens=7 if mode == "offload" else None)  # fmt: skip
        results.append(blocks_loss_and_grads(model, *block_inputs()))
    (ref_loss, ref_grads, ref_input_grad), (loss, grads, input_grad) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(input_grad, ref_input_grad, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
