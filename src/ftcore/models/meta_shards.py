"""How Meta's model-parallel checkpoints divide each tensor across `consolidated.NN.pth` shards.

Facts from Meta's llama reference code (its fairscale model-parallel layers), shard i holding
slice i of N equal slices:
- ColumnParallelLinear splits output features, weight dim 0: `wq`, `wk`, `wv`, `w1`, `w3`, `output`.
- RowParallelLinear splits input features, weight dim 1: `wo`, `w2`.
- `tok_embeddings`: Llama 1/2's ParallelEmbedding splits the model dim (dim 1); Llama 3's
  VocabParallelEmbedding splits the vocabulary (dim 0). On load the shard's shape tells which.
- RMSNorm weights (`attention_norm`, `ffn_norm`, `norm`) and `rope.freqs` are replicated.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

_COLUMN_PARALLEL = {
    "attention.wq",
    "attention.wk",
    "attention.wv",
    "feed_forward.w1",
    "feed_forward.w3",
    "output",
}
_ROW_PARALLEL = {"attention.wo", "feed_forward.w2"}
_SHARD_NAME = re.compile(r"^consolidated\.(\d+)\.pth$")


def checkpoint_files(folder: Path) -> list[Path]:
    """`consolidated.00.pth` .. `consolidated.{N-1}.pth`, in shard order; a gap is an error."""
    files = list(folder.glob("consolidated.*.pth"))
    if not files:
        raise ValueError(f"no consolidated.*.pth in {folder}; point checkpoint_dir at Meta's folder")
    numbered = sorted((int(m.group(1)), path) for path in files if (m := _SHARD_NAME.match(path.name)))
    if [number for number, _ in numbered] != list(range(len(files))):
        names = ", ".join(sorted(path.name for path in files))
        raise ValueError(
            f"{folder} holds {names}: Meta's model-parallel shards are consolidated.00.pth .. "
            f"consolidated.{len(files) - 1:02d}.pth with none missing; restore the missing shard "
            "or remove the stray file"
        )
    return [path for _, path in numbered]


def open_shards(paths: list[Path]) -> list[dict[str, torch.Tensor]]:
    """Memory-map every shard (nothing is read until a tensor is used) and check that all hold
    the same tensor names, so a shard from another checkpoint fails before any copy."""
    shards = [torch.load(path, map_location="cpu", weights_only=True, mmap=True) for path in paths]
    for path, shard in zip(paths[1:], shards[1:]):
        if shard.keys() != shards[0].keys():
            odd = sorted(shard.keys() ^ shards[0].keys())[0]
            where = path.name if odd in shard else paths[0].name
            raise ValueError(
                f"tensor {odd!r} is in {where} but not in every shard of {paths[0].parent}: the "
                "consolidated.*.pth files come from different checkpoints or one is damaged"
            )
    return shards


def split_dim(meta_key: str, embedding_split_dim: int | None) -> int | None:
    """The dim along which `meta_key` is split across shards, or None when replicated."""
    module = re.sub(r"^layers\.\d+\.", "", meta_key.rsplit(".", 1)[0])
    if module == "tok_embeddings":
        return embedding_split_dim
    if module in _COLUMN_PARALLEL:
        return 0
    if module in _ROW_PARALLEL:
        return 1
    return None


def embedding_split_dim_of(shard_shape, full_shape, num_shards: int, path: Path) -> int:
    """0 when a shard holds 1/N of the vocabulary (Llama 3), 1 when 1/N of the model dim (Llama 2)."""
    vocab, dim = full_shape
    if tuple(shard_shape) == (vocab // num_shards, dim) and vocab % num_shards == 0:
        return 0
    if tuple(shard_shape) == (vocab, dim // num_shards) and dim % num_shards == 0:
        return 1
    raise ValueError(
        f"tensor 'tok_embeddings.weight' in {path} has shape {tuple(shard_shape)}, which is not 1/{num_shards} "
        f"of the model's ({vocab}, {dim}) along either dim; check the model size and the shard count"
    )


def merge_shards(
    meta_key: str, shards: list[dict[str, torch.Tensor]], paths: list[Path], full_shape: torch.Size | None
) -> torch.Tensor:
    """The full tensor `meta_key`: the shards' slices concatenated (one new tensor), or the
    replicated copy. `full_shape` (the model's, None if it has no such tensor) identifies the
    embedding split; any other mismatch is left to the loader's shape check."""
    slices = [shard[meta_key] for shard in shards]
    if len(slices) == 1:
        return slices[0]
    for path, piece in zip(paths[1:], slices[1:]):
        if piece.shape != slices[0].shape:
            raise ValueError(
                f"tensor {meta_key!r} has shape {tuple(piece.shape)} in {path.name} but "
                f"{tuple(slices[0].shape)} in {paths[0].name}: Meta's shards split every tensor evenly, "
                "so these files come from different checkpoints"
            )
    embedding_dim = None
    if meta_key == "tok_embeddings.weight" and full_shape is not None:
        embedding_dim = embedding_split_dim_of(slices[0].shape, full_shape, len(paths), paths[0])
    dim = split_dim(meta_key, embedding_dim)
    if dim is None:
        for path, piece in zip(paths[1:], slices[1:]):
            if not torch.equal(piece, slices[0]):
                raise ValueError(
                    f"replicated tensor {meta_key!r} differs between {paths[0].name} and {path.name}: "
                    "these files come from different checkpoints"
                )
        return slices[0]
    return torch.cat(slices, dim=dim)


def shard_slice(meta_key: str, tensor: torch.Tensor, dim: int | None, index: int, num_shards: int):
    """Slice `index` of `num_shards` of a full tensor, as its own storage (torch.save of a view
    would write the whole underlying tensor into every shard)."""
    if dim is None or num_shards == 1:
        return tensor.contiguous()
    if tensor.shape[dim] % num_shards:
        raise ValueError(
            f"tensor {meta_key!r} of shape {tuple(tensor.shape)} cannot be split into {num_shards} "
            f"equal shards along dim {dim}; choose a num_shards that divides {tensor.shape[dim]}"
        )
    return tensor.chunk(num_shards, dim=dim)[index].clone()
