"""Meta's original checkpoints: `consolidated.NN.pth` (+ `params.json`), read with
`torch.load(weights_only=True, mmap=True)` so no pickle code runs and nothing is read twice.

Models too big for one GPU (Llama 2 13B/70B, Llama 3.x 70B/405B) ship as N model-parallel shards,
`consolidated.00.pth` .. `consolidated.{N-1}.pth`, each holding a 1/N slice of every split tensor.
Loading concatenates the N memory-mapped slices of one tensor at a time; saving splits again.
Meta stores q/k rows in the interleaved RoPE layout; they are permuted to rotate-half on load and
back on save (on the full tensor, after concatenation: the permutation acts within each head and a
shard always holds whole heads, so concatenating first gives the same result).
"""

from __future__ import annotations

import json
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
from ftcore.models.meta_shards import (
    checkpoint_files,
    embedding_split_dim_of,
    merge_shards,
    open_shards,
    shard_slice,
    split_dim,
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


def meta_params(state_dict: dict[str, torch.Tensor], n_heads: int, n_kv_heads: int) -> dict:
    """A `params.json` for a checkpoint that came without one, from the tensor shapes.

    Meta's code derives the FFN width as `multiple_of * ceil(int(ffn_dim_multiplier *
    int(8 * dim / 3)) / multiple_of)`; with `multiple_of = hidden_dim` (and a multiplier below 1
    when the width is under 8 * dim / 3) that lands exactly on the stored width."""
    vocab_size, dim = state_dict["tok_embeddings.weight"].shape
    hidden_dim = state_dict["layers.0.mlp.w1.weight"].shape[0]
    n_layers = len({key.split(".")[1] for key in state_dict if key.startswith("layers.")})
    params: dict[str, int | float] = dict(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab_size
    )
    params["multiple_of"] = hidden_dim
    if int(8 * dim / 3) > hidden_dim:
        params["ffn_dim_multiplier"] = hidden_dim / int(8 * dim / 3)
    return params


class MetaCheckpointer:
    """Load/save Meta `consolidated.NN.pth` checkpoints, single-file or model-parallel shards."""

    def __init__(self, checkpoint_dir: str, output_dir: str | None = None):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.output_dir = Path(output_dir) if output_dir is not None else None

    def load_into(self, model: TransformerDecoder) -> None:
        paths = checkpoint_files(self.checkpoint_dir)
        attn = model.layers[0].attn
        shards = open_shards(paths)  # memory-mapped: a slice is read when its tensor is merged
        source = str(paths[0]) if len(paths) == 1 else f"{self.checkpoint_dir} ({len(paths)} shards)"
        loader = TensorLoader(model, source=source)
        for meta_key in shards[0]:
            if meta_key == "rope.freqs":
                continue  # Llama 2 stored its RoPE table; ftcore recomputes it
            key = meta_to_ftcore(meta_key)
            tensor = merge_shards(meta_key, shards, paths, loader.expected.get(key))
            if key.endswith("attn.q_proj.weight"):
                tensor = interleaved_to_halves(tensor, attn.n_heads)
            elif key.endswith("attn.k_proj.weight"):
                tensor = interleaved_to_halves(tensor, attn.n_kv_heads)
            with torch.no_grad():
                loader.load(key, tensor, source_key=meta_key)
            del tensor  # one full tensor alive at a time
        loader.finish()
        reset_buffers(model)

    def save(
        self,
        state_dict: dict[str, torch.Tensor],
        output_dir: str | None = None,
        *,
        n_heads: int | None = None,
        n_kv_heads: int | None = None,
        num_shards: int = 1,
        embedding_split_dim: int | None = None,
        params: dict | None = None,
    ) -> Path:
        """Write `consolidated.00.pth` .. `consolidated.{num_shards-1}.pth` and `params.json`.

        `embedding_split_dim` matters only for several shards: 1 for Llama 2 (ParallelEmbedding
        splits the model dim), 0 for Llama 3 (VocabParallelEmbedding splits the vocabulary);
        None takes the source checkpoint's split. `params.json` is the source's when it has one,
        else derived from the shapes (`meta_params`), updated with `params` (e.g. `norm_eps`,
        `rope_theta`, which the tensors cannot tell). `n_heads` / `n_kv_heads` (needed to undo the q/k
        permutation) default to the source's `params.json`, as when a recipe saves through the checkpointer."""
        target = Path(output_dir) if output_dir is not None else self.output_dir
        if target is None:
            raise ValueError("MetaCheckpointer.save needs an output_dir (argument or constructor)")
        n_heads, n_kv_heads = self._head_counts(n_heads, n_kv_heads)
        if num_shards < 1 or n_heads % num_shards or n_kv_heads % num_shards:
            raise ValueError(
                f"num_shards={num_shards} must be >= 1 and divide n_heads={n_heads} and "
                f"n_kv_heads={n_kv_heads}: Meta's model-parallel layers give every shard whole heads"
            )
        if num_shards > 1 and embedding_split_dim is None:
            embedding_split_dim = self._source_embedding_split_dim(state_dict)
        with atomic_directory(target) as tmp:
            # One shard at a time, so at most 1/num_shards of the model is copied at once.
            for index in range(num_shards):
                shard = {}
                for key, tensor in state_dict.items():
                    if key.endswith("attn.q_proj.weight"):
                        tensor = halves_to_interleaved(tensor, n_heads)
                    elif key.endswith("attn.k_proj.weight"):
                        tensor = halves_to_interleaved(tensor, n_kv_heads)
                    meta_key = ftcore_to_meta(key)
                    dim = split_dim(meta_key, embedding_split_dim)
                    shard[meta_key] = shard_slice(meta_key, tensor.detach().cpu(), dim, index, num_shards)
                torch.save(shard, tmp / f"consolidated.{index:02d}.pth")
                del shard
            self._write_params(tmp, state_dict, n_heads, n_kv_heads, params)
        return target

    def _head_counts(self, n_heads: int | None, n_kv_heads: int | None) -> tuple[int, int]:
        source = self.checkpoint_dir / "params.json"
        params = json.loads(source.read_text()) if source.is_file() else {}
        n_heads = n_heads if n_heads is not None else params.get("n_heads")
        if n_heads is None:
            raise ValueError(
                f"MetaCheckpointer.save needs the attention head count to write q/k in Meta's layout: "
                f"{source} {'has no n_heads' if source.is_file() else 'does not exist'}; pass n_heads= "
                f"(and n_kv_heads= for grouped-query attention)"
            )
        if n_kv_heads is None:
            n_kv_heads = params.get("n_kv_heads", n_heads)  # Meta's params.json omits it without GQA
        return int(n_heads), int(n_kv_heads)

    def _source_embedding_split_dim(self, state_dict: dict[str, torch.Tensor]) -> int:
        paths = sorted(self.checkpoint_dir.glob("consolidated.*.pth"))
        if len(paths) < 2:
            raise ValueError(
                "MetaCheckpointer.save(num_shards > 1) needs embedding_split_dim: 1 for Llama 2 "
                "(embeddings split along the model dim), 0 for Llama 3 (split along the vocabulary)"
            )
        first = torch.load(paths[0], map_location="cpu", weights_only=True, mmap=True)
        full_shape = state_dict["tok_embeddings.weight"].shape
        return embedding_split_dim_of(first["tok_embeddings.weight"].shape, full_shape, len(paths), paths[0])

    def _write_params(self, folder: Path, state_dict, n_heads: int, n_kv_heads: int, extra) -> None:
        source = self.checkpoint_dir / "params.json"
        if source.is_file() and not extra:
            shutil.copy2(source, folder / "params.json")  # keeps Meta's own fields byte for byte
            return
        base = (
            json.loads(source.read_text())
            if source.is_file()
            else meta_params(state_dict, n_heads, n_kv_heads)
        )
        params = {**base, **(extra or {})}
        (folder / "params.json").write_text(json.dumps(params, indent=2) + "\n")
