"""One rank of a distributed test run (started by torchrun) or, run with plain `python`, the
single-process reference. Trains a tiny Llama (full or LoRA) with ftcore's TrainLoop for a few AdamW
steps on a fixed global batch and writes, from rank 0, the losses and the gathered full weights.

    python -m torch.distributed.run --nproc_per_node 2 fsdp_worker.py --kind lora --weights W --out O
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open

from ftcore.data.collate import padded_collate
from ftcore.distributed.env import (
    destroy_distributed,
    exit_process,
    init_distributed,
    launched_by_torchrun,
    report_rank_failure,
)
from ftcore.distributed.fsdp import fsdp_mesh, shard_model
from ftcore.distributed.state import (
    gather_full_state_dict,
    load_full_state_streaming,
    load_training_state,
    save_training_state,
)
from ftcore.models.builders import lora_tiny_llama, tiny_llama
from ftcore.models.checkpoint_common import is_adapter_key
from ftcore.models.transformer import init_weights
from ftcore.modules.lora import get_adapter_params, set_trainable_params
from ftcore.runner.loop import LoopSettings, TrainLoop
from ftcore.runner.loss import LanguageModelLoss
from ftcore.runner.setup import build_loader

VOCAB = 512


def build_model(kind: str) -> torch.nn.Module:
    if kind == "lora":
        return lora_tiny_llama(["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=4, lora_alpha=8.0)
    return tiny_llama()


def toy_dataset(num_rows: int, seed: int = 0) -> list[dict]:
    """Rows of different lengths with a masked prompt, so ranks see different trained-token counts."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        length, prompt = rng.randint(6, 20), rng.randint(1, 5)
        tokens = [rng.randrange(1, VOCAB) for _ in range(length)]
        rows.append({"tokens": tokens, "labels": [-100] * prompt + tokens[prompt:]})
    return rows


class _Recorder:
    def __init__(self):
        self.losses = []

    def log(self, metrics: dict, step: int) -> None:
        if "loss" in metrics:
            self.losses.append(metrics["loss"])

    def close(self) -> None:
        pass


def _read_tensors(path: str, adapters: bool):
    with safe_open(path, framework="pt") as file:
        for key in file.keys():
            if is_adapter_key(key) == adapters:
                yield key, file.get_tensor(key)


OFFLOADED_STORAGES = [0]  # storages the offloaded blocks copied to the host, summed over their forwards


def offload_blocks(model: torch.nn.Module, count: int) -> None:
    """`ac_offload_blocks`' wrapping of the first `count` blocks, copying every saved storage (the tiny
    model's are all under the default size threshold), and counting what they copy."""
    from ftcore.training.unchecked_offload import BlockActivations, apply_unchecked_offloading

    finish = BlockActivations.finish_forward

    def counting_finish(activations: BlockActivations) -> None:
        OFFLOADED_STORAGES[0] += len(activations.host)
        finish(activations)

    BlockActivations.finish_forward = counting_finish  # type: ignore[method-assign]
    apply_unchecked_offloading(model, list(range(count)), min_bytes=0)


def materialize(kind: str, weights: str, sharded: bool, offloaded: int = 0) -> torch.nn.Module:
    """Meta build -> (offloaded blocks) -> shard (when distributed) -> to_empty -> init -> stream the weights in."""
    with torch.device("meta"):
        model = build_model(kind)
    if offloaded:
        offload_blocks(model, offloaded)
    if sharded:
        shard_model(model, fsdp_mesh("cpu"))
    model.to_empty(device="cpu")
    init_weights(model)
    load_full_state_streaming(model, _read_tensors(weights, adapters=False), source=weights)
    if kind == "lora":
        # Adapters are no base-checkpoint tensors; a full-tensor load_state_dict places each rank's shard.
        model.load_state_dict(dict(_read_tensors(weights, adapters=True)), strict=False)
        set_trainable_params(model, get_adapter_params(model))
    return model


@report_rank_failure
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=("full", "lora"), default="full")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global_batch", type=int, default=8)
    parser.add_argument("--save_state", help="write the DCP training state here after the last step")
    parser.add_argument("--resume", help="load the DCP training state from here before training")
    parser.add_argument(
        "--offload_blocks", type=int, default=0, help="the first N blocks as ac_offload_blocks runs them"
    )
    parser.add_argument("--fail_rank", type=int, help="this rank raises before its first step (failure test)")
    parser.add_argument("--hang_rank", type=int, help="this rank stalls before its first step (hang test)")
    parser.add_argument(
        "--timeout_s", type=float, default=60.0, help="the process group's collective timeout"
    )
    args = parser.parse_args(argv)

    distributed = launched_by_torchrun()
    rank, world = (
        (init_distributed(backend="gloo", timeout_s=args.timeout_s).rank, dist.get_world_size())
        if distributed
        else (0, 1)
    )
    torch.manual_seed(0)
    model = materialize(args.kind, args.weights, sharded=distributed, offloaded=args.offload_blocks)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-3, weight_decay=0.01)
    loader, sampler = build_loader(
        toy_dataset(64),
        lambda b: padded_collate(b, pad_id=0),
        args.global_batch // world,
        shuffle=False,
        seed=0,
        rank=rank,
        world_size=world,
    )
    recorder = _Recorder()
    loss = LanguageModelLoss(chunk_size=16)
    settings = LoopSettings(max_steps=args.steps, clip_grad_norm=1.0)
    loop = TrainLoop(
        model, optimizer, None, loader, sampler, loss, settings, recorder, lambda tag: None, is_main=rank == 0
    )
    if args.resume:
        load_training_state(args.resume, model, optimizer)
        progress = json.loads((Path(args.resume) / "progress.json").read_text())
        loop.progress.step = progress["step"]
        # per-rank batches consumed: the same for every world size at a fixed global batch
        loop.progress.batches_in_epoch = progress["step"] * settings.gradient_accumulation_steps
        settings.max_steps = progress["step"] + args.steps
    if args.fail_rank == rank:
        raise RuntimeError(f"injected failure on rank {rank}")
    if args.hang_rank == rank:
        time.sleep(600)  # a stuck rank: the others must time out in their first collective
    loop.run()
    if args.save_state:
        save_training_state(args.save_state, model, optimizer)
        if rank == 0:
            (Path(args.save_state) / "progress.json").write_text(json.dumps({"step": loop.progress.step}))
    weights = gather_full_state_dict(model)
    if rank == 0:
        torch.save(
            {
                "losses": recorder.losses,
                "weights": weights,
                "world_size": world,
                "offloaded": OFFLOADED_STORAGES[0],
            },
            args.out,
        )
    destroy_distributed()


if __name__ == "__main__":
    main()
    exit_process(0)  # see exit_process: skips an intermittent abort at interpreter shutdown
