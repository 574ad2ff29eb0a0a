"""QLoRA under FSDP2 with the NF4 data sharded: 2 CPU processes (gloo) against one plain process.

The file is also the rank program: torchrun runs it as a script. The model is a tiny QLoRA Llama
whose projection dims are multiples of 64 (dim 128, MLP 384: one w1 has 384 rows, 192 per rank; its 3
nested scales, fp32, stay whole on each rank). Both runs load the same float checkpoint, which each
quantizes on the fly, then take 3 AdamW steps (fp32 compute) on the same global batch of 8 rows.
The single process is the reference: its NF4 layers hold their data as plain buffers, untouched.

    PYTHONPATH=. python -m torch.distributed.run --nproc_per_node 2 tests/distributed/test_nf4_fsdp.py \
        --weights start.safetensors --out out.pt
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ftcore.data.collate import padded_collate
from ftcore.distributed.env import destroy_distributed, exit_process, init_distributed, launched_by_torchrun
from ftcore.distributed.fsdp import fsdp_mesh, reshard_all, shard_model
from ftcore.distributed.state import gather_full_state_dict, load_full_state_streaming
from ftcore.models.builders import lora_tiny_llama, tiny_llama
from ftcore.models.transformer import init_weights
from ftcore.modules.lora import get_adapter_params, set_trainable_params
from ftcore.modules.nf4 import nf4_state_dict_mode
from ftcore.runner.loop import LoopSettings, TrainLoop
from ftcore.runner.loss import LanguageModelLoss
from ftcore.runner.setup import build_loader
from tests.distributed.fsdp_worker import _Recorder, toy_dataset

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5
SIZES = {"dim": 128, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 384}
NF4_PARTS = ("weight_packed", "weight_absmax")  # the sharded ones
NF4_BUFFERS = ("weight_nested_absmax", "weight_offset")  # fp32: whole on every rank


def build_qlora() -> torch.nn.Module:
    return lora_tiny_llama(
        ["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=4, lora_alpha=8.0, quantize_base=True, **SIZES
    )


def _local_nf4_sizes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """{part name: (local elements, bytes of the storage behind them)} of every NF4 part on this rank."""
    sizes = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:  # parameters once sharded
        if name.rpartition(".")[2] in NF4_PARTS:
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            sizes[name] = (local.numel(), local.untyped_storage().nbytes())
    return sizes


def _all_gathered_bytes_in_one_forward(model: torch.nn.Module, tokens: torch.Tensor) -> list[tuple]:
    """(dtype, output bytes) of every all-gather FSDP2 issues during one forward (no grad)."""
    calls, original = [], dist.all_gather_single  # FSDP2's default all-gather calls it (torch 2.13)

    def recording(output, input, *args, **kwargs):
        calls.append((str(output.dtype), output.numel() * output.element_size()))
        return original(output, input, *args, **kwargs)

    dist.all_gather_single = recording
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        dist.all_gather_single = original
    reshard_all(model)  # the root and last block stay gathered after a no-grad forward
    return calls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--bf16-compute", action="store_true", help="FSDP2 param_dtype bf16, fp32 reduce")
    args = parser.parse_args(argv)

    distributed = launched_by_torchrun()
    rank, world = (
        (init_distributed(backend="gloo", timeout_s=60).rank, dist.get_world_size())
        if distributed
        else (0, 1)
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = build_qlora()
    if distributed:
        precision = dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.bf16_compute else {}
        shard_model(model, fsdp_mesh("cpu"), **precision)
    model.to_empty(device="cpu")
    init_weights(model)
    from safetensors import safe_open

    with safe_open(args.weights, framework="pt") as file:
        base = [(k, file.get_tensor(k)) for k in file.keys() if "lora_" not in k]
        adapters = {k: file.get_tensor(k) for k in file.keys() if "lora_" in k}
    load_full_state_streaming(model, base, source=args.weights)  # float weights: quantized on the fly
    model.load_state_dict(adapters, strict=False)
    set_trainable_params(model, get_adapter_params(model))
    shard_sizes = _local_nf4_sizes(model)
    gathered = (
        _all_gathered_bytes_in_one_forward(
            model, torch.randint(1, 512, (2, 8), generator=torch.Generator().manual_seed(0))
        )
        if distributed
        else []
    )

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-3, weight_decay=0.01)
    loader, sampler = build_loader(
        toy_dataset(64), lambda b: padded_collate(b, pad_id=0), 8 // world, False, 0, rank, world
    )
    recorder = _Recorder()
    settings = LoopSettings(max_steps=args.steps, clip_grad_norm=1.0)
    loop = TrainLoop(model, optimizer, None, loader, sampler, LanguageModelLoss(chunk_size=16), settings,
                     recorder, lambda tag: None, is_main=rank == 0)  # fmt: skip
    loop.run()

    weights = gather_full_state_dict(model)  # bf16 `weight` for every NF4 base
    with nf4_state_dict_mode("nf4"):
        parts = gather_full_state_dict(model)  # the 4-bit parts themselves
    all_sizes = [None] * world
    if distributed:
        dist.all_gather_object(all_sizes, shard_sizes)
    else:
        all_sizes = [shard_sizes]
    if rank == 0:
        result = {"losses": recorder.losses, "weights": weights, "parts": parts, "world_size": world,
                  "shard_sizes": all_sizes, "all_gathers": gathered}  # fmt: skip
        torch.save(result, args.out)
    if distributed:
        destroy_distributed()


# ---- the tests (pytest) ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict, torch.nn.Module, dict]:
    """(1-process result, 2-rank result, the unsharded model the checkpoint came from, 2 ranks computing
    in bf16)."""
    folder = tmp_path_factory.mktemp("nf4_fsdp")
    torch.manual_seed(1)
    float_base = tiny_llama(**SIZES)  # a float checkpoint, as a Hugging Face base model is stored
    init_weights(float_base)
    adapters = {k: v for k, v in build_qlora().state_dict().items() if "lora_" in k}
    # B != 0, so both adapter factors train from the first step
    adapters = {k: torch.randn_like(v) * 0.02 if "lora_b" in k else v for k, v in adapters.items()}
    weights = folder / "start.safetensors"
    save_file({**float_base.state_dict(), **adapters}, str(weights))

    main(["--weights", str(weights), "--out", str(folder / "one.pt")])
    two = _two_ranks(weights, folder / "two.pt")
    bf16 = _two_ranks(weights, folder / "bf16.pt", "--bf16-compute")
    return torch.load(folder / "one.pt"), two, float_base, bf16


def _two_ranks(weights: Path, out: Path, *options: str) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               __file__, "--weights", str(weights), "--out", str(out), *options]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out)


def test_qlora_on_two_ranks_equals_one_process(runs):
    one, two, *_ = runs
    assert two["world_size"] == 2 and len(two["losses"]) == 3
    assert one["losses"][0] != one["losses"][-1]  # it trained
    assert two["losses"] == pytest.approx(one["losses"], abs=TOL)
    assert one["weights"].keys() == two["weights"].keys()
    for name, tensor in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], tensor, atol=TOL, rtol=0, msg=name)


def test_nf4_bytes_quantized_on_each_rank_equal_one_process(runs):
    # Each rank quantized the full float weight and kept its shard: gathered back, bit for bit the
    # single process's NF4 data, and the bf16 `weight` dequantized from them is the same too.
    one, two, float_base, _ = runs
    assert one["parts"].keys() == two["parts"].keys()
    packed = [k for k in one["parts"] if k.endswith("weight_packed")]
    assert len(packed) == 2 * 7  # every block projection is NF4
    for name, tensor in one["parts"].items():
        if name.rpartition(".")[2] in (*NF4_PARTS, "weight_offset"):
            assert torch.equal(two["parts"][name], tensor), name
    for key in packed:
        weight = key.replace("weight_packed", "weight")
        assert two["weights"][weight].dtype == torch.bfloat16
        assert torch.equal(two["weights"][weight], one["weights"][weight])
        # and it is the float checkpoint up to NF4 error (|w| <= 0.1 here; one code step is ~0.16 absmax)
        error = (two["weights"][weight].float() - float_base.state_dict()[weight]).abs().max()
        assert 0 < error < 0.2 * float_base.state_dict()[weight].abs().max()


def test_each_rank_holds_half_of_the_nf4_data(runs):
    one, two, *_ = runs
    full = {name: numel for name, (numel, _) in one["shard_sizes"][0].items()}
    for rank, sizes in enumerate(two["shard_sizes"]):
        assert sizes.keys() == full.keys()
        for name, (numel, storage_bytes) in sizes.items():
            rows = two["parts"][name.replace("nf4_base.", "")].shape
            chunk = math.ceil(rows[0] / 2)  # dim-0 chunks: rank 0 takes ceil, rank 1 the rest
            expected_rows = min(chunk, rows[0] - rank * chunk)
            assert numel == expected_rows * math.prod(rows[1:]), name
            assert storage_bytes <= chunk * math.prod(rows[1:]), name  # uint8: no full copy behind it
    total = sum(full.values())
    for sizes in two["shard_sizes"]:
        assert sum(numel for numel, _ in sizes.values()) == pytest.approx(total / 2, rel=0.01)


def test_nf4_blocks_are_all_gathered_as_4bit_data(runs):
    _, two, float_base, _ = runs
    gathers = two["all_gathers"]
    assert len(gathers) == 3  # the root, then each of the 2 blocks once
    base_weights = sum(
        m.weight.numel() for m in float_base.layers[0].modules() if isinstance(m, torch.nn.Linear)
    )
    for index, (dtype, nbytes) in enumerate(gathers[1:]):
        # A block of mixed dtypes (uint8 codes, fp32 adapters and norms) goes as bytes: each tensor's
        # dim 0 padded to a multiple of 2 ranks, at its stored size. The fp32 NF4 scales are buffers.
        assert dtype == "torch.uint8"
        stored = {**two["parts"], **two["weights"]}
        block = [
            t
            for k, t in stored.items()
            if k.startswith(f"layers.{index}.") and t.dtype != torch.bfloat16 and not k.endswith(NF4_BUFFERS)
        ]
        padded = sum(
            math.ceil(t.shape[0] / 2) * 2 * math.prod(t.shape[1:]) * t.element_size()
            for t in block
            if t.dim()
        )
        assert nbytes == padded
        nf4 = [t for k, t in stored.items() if k.startswith(f"layers.{index}.") and k.endswith(NF4_PARTS)]
        nf4_bits = 8 * sum(t.numel() * t.element_size() for t in nf4) / base_weights
        assert nf4_bits == 4.125  # the base travels at 4 bits + one absmax byte per 64 weights, not bf16's 16
        assert nbytes < 2 * base_weights  # the whole unit gathers less than a bf16 base alone


def test_bf16_compute_leaves_the_nf4_scales_in_fp32(runs):
    """FSDP2's param_dtype casts float parameters; the NF4 scales are buffers, so they stay exact."""
    one, _, _, bf16 = runs
    assert len(bf16["losses"]) == len(one["losses"])
    for loss, reference in zip(bf16["losses"], one["losses"], strict=True):
        assert abs(loss - reference) < 0.02 * abs(reference), (loss, reference)  # bf16 compute
    for name, tensor in one["parts"].items():
        if name.endswith((*NF4_PARTS, *NF4_BUFFERS)):
            assert bf16["parts"][name].dtype == tensor.dtype and torch.equal(bf16["parts"][name], tensor), (
                name
            )


if __name__ == "__main__":
    main()
    exit_process(0)  # see exit_process: skips an intermittent abort at interpreter shutdown
