"""Peak memory and time of loading a Hugging Face safetensors checkpoint into a QLoRA (or LoRA) model.

1. Writes a random-weight checkpoint of the model's shape in HF layout (5 GB shards + index +
   config.json), one shard in host memory at a time.
2. In a fresh process, builds the model exactly as the recipes do (`ftcore.runner.setup.build_model`:
   meta build -> `to_empty` on the device -> init -> `HFCheckpointer.load_into`, which streams one
   tensor at a time and, for QLoRA, quantizes each projection to NF4 on the device as it arrives) and
   reports the GPU peak allocated, the host's peak anonymous memory (heap, sampled every 20 ms; the
   mmapped checkpoint pages are page cache, reclaimable, and not counted), wall time, and the model's
   own resident size (parameters + buffers).

Usage: python scripts/bench_load.py --model llama3_1_8b --mode qlora --dir /tmp/ckpt_8b [--device cuda]
Prints one line `LOAD {json}`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

SHARD_BYTES = 5 * 10**9
LORA_ATTN_MODULES = ["q_proj", "k_proj", "v_proj", "output_proj"]


# A small Llama for the CPU test of this script (every in_dim divides by the NF4 block of 64).
TINY_SIZES = dict(
    vocab_size=1024, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256, max_seq_len=512
)


def _sizes(name: str) -> dict:
    from ftcore.models.families import SIZES

    return TINY_SIZES if name == "tiny" else SIZES[name]


def model_config(name: str, mode: str) -> dict:
    """The `model:` node a shipped config would hold for this size (the generic builders for `tiny`)."""
    lora = "" if mode == "full" else "lora_"
    node = {"_component_": f"ftcore.models.{lora}{name}"}
    if name == "tiny":
        node = {"_component_": f"ftcore.models.{lora}transformer_decoder", **TINY_SIZES}
    if mode == "full":
        return node
    return {
        **node,
        "lora_attn_modules": LORA_ATTN_MODULES,
        "apply_lora_to_mlp": True,
        "lora_rank": 8,
        "lora_alpha": 16,
        "quantize_base": mode == "qlora",
    }


def write_random_checkpoint(name: str, target: Path) -> int:
    """A random bf16 HF checkpoint of `name`'s full (non-LoRA) shape; returns its bytes."""
    from safetensors.torch import save_file

    import ftcore.models
    from ftcore.models.checkpoint_hf import INDEX_FILE, hf_config_from_sizes
    from ftcore.models.hf_names import ftcore_to_hf

    with torch.device("meta"):
        model = ftcore.models.transformer_decoder(**_sizes(name))
        shapes = {key: t.shape for key, t in model.state_dict().items()}
    target.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random draws on the GPU are ~100x faster
    shards, shard, shard_bytes, weight_map, total = [], {}, 0, {}, 0
    for key, shape in shapes.items():
        tensor = (torch.randn(shape, device=device, dtype=torch.bfloat16) * 0.02).cpu()
        shard[ftcore_to_hf(key)] = tensor
        shard_bytes += tensor.numel() * 2
        if shard_bytes >= SHARD_BYTES:
            shards.append(_save_shard(shard, target, len(shards), save_file))
            total, shard, shard_bytes = total + shard_bytes, {}, 0
    if shard:
        shards.append(_save_shard(shard, target, len(shards), save_file))
        total += shard_bytes
    for file_name, keys in shards:
        weight_map.update({key: file_name for key in keys})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (target / INDEX_FILE).write_text(json.dumps(index))
    (target / "config.json").write_text(json.dumps(hf_config_from_sizes(_sizes(name))))
    return total


def _save_shard(shard: dict, target: Path, number: int, save_file) -> tuple[str, list[str]]:
    file_name = f"model-{number + 1:05d}.safetensors"
    save_file(shard, target / file_name, metadata={"format": "pt"})
    return file_name, list(shard)


class AnonPeak:
    """Peak RssAnon of this process, sampled on a thread (Linux /proc)."""

    def __init__(self, period_s: float = 0.02):
        self.peak_kib, self._stop, self.period_s = 0, threading.Event(), period_s
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current_kib() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, self.current_kib())
            time.sleep(self.period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, self.current_kib())


def measure_load(name: str, mode: str, checkpoint_dir: Path, device_name: str) -> dict:
    from omegaconf import OmegaConf

    from ftcore.models.checkpoint_hf import HFCheckpointer
    from ftcore.runner.setup import build_model

    device = torch.device(device_name)
    cfg = OmegaConf.create(model_config(name, mode))
    before_kib = AnonPeak.current_kib()
    start = time.perf_counter()
    with AnonPeak() as host:
        model = build_model(cfg, device, torch.bfloat16, HFCheckpointer(str(checkpoint_dir)))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    resident = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    gib = 2**30
    return dict(
        model=name,
        mode=mode,
        device=device_name,
        load_s=round(seconds, 1),
        model_resident_gib=round(resident / gib, 3),
        model_resident_bytes=resident,
        gpu_peak_alloc_gib=round(torch.cuda.max_memory_allocated(device) / gib, 3)
        if device.type == "cuda"
        else None,
        host_anon_peak_gib=round(host.peak_kib / 2**20, 3),
        host_anon_before_gib=round(before_kib / 2**20, 3),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama3_1_8b")
    p.add_argument("--mode", default="qlora", choices=["full", "lora", "qlora"])
    p.add_argument("--dir", type=Path, required=True, help="where the random checkpoint is (or is written)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    if args.measure_only:
        print("LOAD", json.dumps(measure_load(args.model, args.mode, args.dir, args.device)), flush=True)
        return 0
    if not (args.dir / "config.json").is_file():
        start = time.perf_counter()
        size = write_random_checkpoint(args.model, args.dir)
        print(
            f"wrote {size / 2**30:.2f} GiB of random weights to {args.dir} in {time.perf_counter() - start:.0f} s"
        )
    # A fresh process, so the host peak is the load's alone (not the writer's buffers).
    child = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--measure-only"]
    return subprocess.run(child, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
