"""`offload_embedding`: a frozen token embedding kept in pinned host memory, its rows read by the GPU.

A step reads only the rows of the tokens it sees (B x T of a 128K vocabulary), so the table need not
take GPU memory: 0.98 GiB for Llama-3.1-8B (128,256 x 4,096 in bf16), 1.96 GiB for 70B. It lives in
page-locked host memory, which a CUDA device addresses directly (unified virtual addressing: the
host pointer is valid in kernels), and torch's own embedding kernel gathers the rows through a CUDA
view of that memory: B x T x dim x 2 bytes cross PCIe a step (32 MiB at 2 x 2048 tokens), with no
host synchronization, so a CUDA graph captures it. Unsloth's `offload_embedding` makes the same trade.

Only a frozen, untied table can live there: a trained one needs its gradient and optimizer state on
the GPU, and a tied one is also the output projection, which every step multiplies in full.
"""

from __future__ import annotations

import logging
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("ftcore")
_INTEGER_TYPESTR = {1: "|i1", 2: "<i2", 4: "<i4", 8: "<i8"}  # by element size


TIED_REFUSAL = (
    "offload_embedding: true: this model ties its output projection to the token embedding (e.g. Llama 3.2 "
    "1B/3B, model.tie_embeddings: true), which every step multiplies in full on the GPU; set "
    "offload_embedding: false"
)


class _HostMemory:
    """Pinned host memory described as CUDA-addressable (`__cuda_array_interface__`), under UVA."""

    def __init__(self, table: torch.Tensor):
        self.table = table  # held: the view's memory lives as long as this object
        self.__cuda_array_interface__ = {
            "shape": tuple(table.shape),
            # the interface has no bf16: an integer of the same width, viewed back
            "typestr": _INTEGER_TYPESTR[table.element_size()],
            "data": (table.data_ptr(), False),
            "strides": None,
            "version": 2,
        }


def cuda_view(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CUDA tensor on `device` that aliases the pinned host `table` (no copy, no GPU memory)."""
    if not table.is_pinned():
        raise RuntimeError(
            "offload_embedding: the token table is not in pinned host memory, which a GPU cannot read in "
            "place; this happens when CUDA was not available as the model was built. Build the model "
            "where CUDA is available, or set offload_embedding: false"
        )
    view = torch.as_tensor(_HostMemory(table.contiguous()), device=device).view(table.dtype)
    if view.data_ptr() != table.data_ptr():  # torch copied instead of aliasing: the GPU memory is spent
        raise RuntimeError(
            f"offload_embedding: {device} cannot address this process's pinned host memory in place "
            "(no unified addressing); set offload_embedding: false"
        )
    return view


def _to_host(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` as a host tensor of `dtype`, page-locked when a GPU may read it (meta: empty).

    Copied straight into the pinned buffer, so the host holds one copy of the table, not two. torch's
    pinned allocator rounds each allocation up to a power of two (docs/training.md says what it costs)."""
    host = torch.empty(tensor.shape, dtype=dtype, pin_memory=torch.cuda.is_available())
    return host if tensor.is_meta else host.copy_(tensor.detach())


class HostEmbedding(nn.Embedding):
    """A frozen `nn.Embedding` whose table stays in host memory through `.to(device)` and `to_empty`.

    CPU token ids are looked up on the host; CUDA token ids read the rows in place on their device.
    The parameter keeps the name `weight`, so state dicts and checkpoints are those of `nn.Embedding`.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype | None = None):
        super().__init__(num_embeddings, embedding_dim, device="meta", dtype=dtype)
        self.weight.requires_grad_(False)
        self._view: tuple[tuple[torch.device, int], torch.Tensor] | None = None  # ((device, address), view)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> HostEmbedding:
        if embedding.max_norm is not None:
            raise ValueError(
                "offload_embedding: an embedding with max_norm rewrites its table, which host memory cannot "
                "serve in place; set offload_embedding: false"
            )
        host = cls(embedding.num_embeddings, embedding.embedding_dim, dtype=embedding.weight.dtype)
        host._set_table(_to_host(embedding.weight, embedding.weight.dtype))
        return host

    def _set_table(self, table: torch.Tensor) -> None:
        self.weight = nn.Parameter(table, requires_grad=False)
        self._view = None

    def _apply(self, fn, recurse=True):
        # `.to(device)`, `.cuda()` and `to_empty` would put the table on the GPU: keep it on the host and
        # apply only the dtype that `fn` gives (read from a tensor of no elements).
        dtype = fn(torch.empty(0, dtype=self.weight.dtype, device=self.weight.device)).dtype
        if self.weight.is_meta or dtype != self.weight.dtype:
            self._set_table(_to_host(self.weight, dtype))
        return self

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:  # the CUDA view is not linked to the parameter: no gradient would come
            raise ValueError(
                "offload_embedding: the token table in host memory was set to train (requires_grad); it "
                "must stay frozen. Set offload_embedding: false to train the embedding"
            )
        if tokens.device.type == "cpu":
            return F.embedding(tokens, self.weight)
        # keyed by the table's address too: a table replaced (load_state_dict(assign=True)) gets a new view
        key = (tokens.device, self.weight.data_ptr())
        if self._view is None or self._view[0] != key:
            self._view = (key, cuda_view(self.weight, tokens.device))
        return F.embedding(tokens, self._view[1])

    def extra_repr(self) -> str:
        return super().extra_repr() + ", in host memory"


def offload_token_embedding(model: nn.Module) -> None:
    """Swap `model.tok_embeddings` for a HostEmbedding holding the same table (setup, before FSDP2).

    Refused for a tied embedding (the output projection reads it whole every step) and for a trained
    one, each naming the config key to change."""
    if getattr(model, "tied_embeddings", False):
        raise ValueError(TIED_REFUSAL)
    embedding = model.get_submodule("tok_embeddings")
    if isinstance(embedding, HostEmbedding):
        return
    if type(embedding) is not nn.Embedding:
        raise ValueError(
            f"offload_embedding: true supports a plain nn.Embedding token table, but tok_embeddings is a "
            f"{type(embedding).__name__}; set offload_embedding: false"
        )
    if embedding.weight.requires_grad:
        raise ValueError(
            "offload_embedding: true needs a frozen token embedding (LoRA, QLoRA, DPO), but this run trains "
            "it (full fine-tuning); set offload_embedding: false"
        )
    host = HostEmbedding.from_embedding(embedding)
    model.tok_embeddings = host
    log.info("offload_embedding: the token table (%.2f GiB) stays in host memory", host.weight.nbytes / 2**30)


def host_parameters(model: nn.Module) -> set[nn.Parameter]:
    """The parameters kept in host memory, which FSDP2 must leave unsharded and in place."""
    return {cast(nn.Parameter, m.weight) for m in model.modules() if isinstance(m, HostEmbedding)}


def compute_device(model: nn.Module) -> torch.device:
    """The device `model` computes on: its first parameter's that is not kept in host memory."""
    on_host = host_parameters(model)
    return next(p.device for p in model.parameters() if p not in on_host)
