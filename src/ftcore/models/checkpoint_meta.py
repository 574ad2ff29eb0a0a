"""Meta's original checkpoints: `consolidated.00.pth` (+ `params.json`), read with
`torch.load(weights_only=True, mmap=True)` so no pickle code runs and nothing is read twice.

Meta stores q/k rows in the interleaved RoPE layout; they are permuted to rotate-half on load and
back on save.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from ftcore.models.checkpoint_common import (
    TensorLoader,
    atomic_directory,
    halves_to_interleaved,
    interleaved_to_halves,
)
from ftcore.models.transformer import TransformerDecoder, reset_buffers

_IN_BLOCK = {
    "attention.wq": "attn.q_proj",
    "attention.wk": "attn.k_proj",
    "attention.wv": "attn.v_proj",
    "attention.wo": "attn.output_proj",
    "feed_forward.w1": "mlp.w1",
    "feed_forward.w2": "mlp.w2",
    "feed_forward.w3": "mlp.w3",
    "attention_norm": "attn_norm",
    "ffn_norm": "mlp_norm",
}
_IN_BLOCK_BACK = {ours: meta for meta, ours in _IN_BLOCK.items()}
_META_BLOCK = re.compile(r"^layers\.(\d+)\.(" + "|".join(map(re.escape, _IN_BLOCK)) + r")\.(weight|bias)$")
_OURS_BLOCK = re.compile(
    r"^layers\.(\d+)\.(" + "|".join(map(re.escape, _IN_BLOCK_BACK)) + r")\.(weight|bias)$"
)
_TOP_LEVEL = ("tok_embeddings.weight", "norm.weight", "output.weight")
CHECKPOINT_FILE = "consolidated.00.pth"


def meta_to_ftcore(key: str) -> str:
    if match := _META_BLOCK.match(key):
        layer, module, leaf = match.groups()
        return f"layers.{layer}.{_IN_BLOCK[module]}.{leaf}"
    if key in _TOP_LEVEL:
        return key
    raise ValueError(f"unexpected tensor {key!r} in the Meta checkpoint (not a Llama parameter name)")


def ftcore_to_meta(key: str) -> str:
    if match := _OURS_BLOCK.match(key):
        layer, module, leaf = match.groups()
        return f"layers.{layer}.{_IN_BLOCK_BACK[module]}.{leaf}"
    if key in _TOP_LEVEL:
        return key
    raise ValueError(f"no Meta name for ftcore parameter {key!r}")


class MetaCheckpointer:
    """Load/save Meta `consolidated.00.pth` checkpoints (single file, i.e. models Meta ships
    unsharded: Llama 2 7B, Llama 3.x 1B-8B; larger ones: convert to HF first)."""

    def __init__(self, checkpoint_dir: str, output_dir: str | None = None):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.output_dir = Path(output_dir) if output_dir is not None else None

    def checkpoint_file(self) -> Path:
        files = sorted(self.checkpoint_dir.glob("consolidated.*.pth"))
        if not files:
            raise ValueError(
                f"no consolidated.*.pth in {self.checkpoint_dir}; point checkpoint_dir at Meta's folder"
            )
        if len(files) > 1:
            raise ValueError(
                f"{self.checkpoint_dir} holds {len(files)} model-parallel shards; ftcore reads single-file "
                "Meta checkpoints only: use the Hugging Face release of this model with HFCheckpointer"
            )
        return files[0]

    def load_into(self, model: TransformerDecoder) -> None:
        path = self.checkpoint_file()
        attn = model.layers[0].attn
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        loader = TensorLoader(model, source=str(path))
        for meta_key, tensor in state.items():
            if meta_key == "rope.freqs":
                continue  # Llama 2 stored its RoPE table; ftcore recomputes it
            key = meta_to_ftcore(meta_key)
            if key.endswith("attn.q_proj.weight"):
                tensor = interleaved_to_halves(tensor, attn.n_heads)
            elif key.endswith("attn.k_proj.weight"):
                tensor = interleaved_to_halves(tensor, attn.n_kv_heads)
            with torch.no_grad():
                loader.load(key, tensor, source_key=meta_key)
        loader.finish()
        reset_buffers(model)

    def save(
        self,
        state_dict: dict[str, torch.Tensor],
        output_dir: str | None = None,
        *,
        n_heads: int,
        n_kv_heads: int,
    ) -> Path:
        """Write `consolidated.00.pth` (+ params.json copied when the source had one)."""
        target = Path(output_dir) if output_dir is not None else self.output_dir
        if target is None:
            raise ValueError("MetaCheckpointer.save needs an output_dir (argument or constructor)")
        meta_state = {}
        for key, tensor in state_dict.items():
            if key.endswith("attn.q_proj.weight"):
                tensor = halves_to_interleaved(tensor, n_heads)
            elif key.endswith("attn.k_proj.weight"):
                tensor = halves_to_interleaved(tensor, n_kv_heads)
            meta_state[ftcore_to_meta(key)] = tensor.detach().contiguous().cpu()
        with atomic_directory(target) as tmp:
            torch.save(meta_state, tmp / CHECKPOINT_FILE)
            if (self.checkpoint_dir / "params.json").is_file():
                shutil.copy2(self.checkpoint_dir / "params.json", tmp / "params.json")
        return target
