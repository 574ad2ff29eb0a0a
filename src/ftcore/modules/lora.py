"""LoRA and DoRA adapters as one hand-written layer, plus the helpers that act on a whole model.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685):
a frozen weight W0 (out, in) is adapted by a trainable low-rank product,

    h = W0 x + b + (alpha / r) * B A x,    A: (r, in), B: (out, r), r << min(in, out)

A starts random and B starts at zero, so the adapted model equals the base model at step 0 (paper,
section 4.1). A uses nn.Linear's default Kaiming-uniform init (a = sqrt(5)), as the authors'
reference implementation `loralib` and HF PEFT do.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353) splits the
adapted weight into a magnitude and a direction,

    W' = m * (W0 + s B A) / ||W0 + s B A||_row,     s = alpha / r

with the norm taken per output row (PEFT's `weight.norm(p=2, dim=1)`; the paper writes it per column
of the transposed (in, out) matrix), and m initialised to ||W0||_row so that W' = W0 at step 0. As the
paper recommends (section 4.3), the norm is treated as a constant in backprop (detached).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ftcore.modules.lora_matmul import lora_matmul
from ftcore.modules.recompute import is_recomputing

# State-dict names (relative to a LoRALinear) of the trainable adapter tensors.
ADAPTER_PARAM_NAMES = ("lora_a.weight", "lora_b.weight", "magnitude")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (LoRA), optionally DoRA.

    State-dict keys: `weight` (out, in) and `bias` as in the nn.Linear it replaces, `lora_a.weight`
    (rank, in), `lora_b.weight` (out, rank) and, with DoRA, `magnitude` (out,).
    With `quantize_base` the frozen weight is stored in NF4 (QLoRA); loading a float `weight`
    quantizes it on the fly (the NF4Linear child does it; hooks keep the key `weight`).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_bias: bool = False,
        quantize_base: bool = False,
        use_dora: bool = False,
    ):
        super().__init__()
        if rank <= 0 or rank > min(in_dim, out_dim):
            raise ValueError(
                f"LoRA rank must be in [1, min(in_dim, out_dim)={min(in_dim, out_dim)}], got {rank}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.in_dim, self.out_dim, self.rank, self.alpha = in_dim, out_dim, rank, alpha
        self.scaling = alpha / rank
        self.quantize_base = quantize_base
        self.use_dora = use_dora
        self.merged = False
        self.disabled = False
        # Set on a block's closing projection by activation checkpointing: a recompute discards this
        # layer's output, so it may leave out the GEMMs (ftcore.modules.recompute).
        self.skip_output_in_recompute = False
        # Row norms of W0 + s B A captured at merge time, needed to undo a DoRA merge.
        self._dora_merge_norm: torch.Tensor | None = None

        if quantize_base:
            # QLoRA: the frozen base is an NF4Linear child. It quantizes a float `weight` as it loads
            # and saves a bf16 `weight`; the two hooks below drop its name from the state-dict keys,
            # so the keys stay `weight`, as in the nn.Linear this layer replaces.
            from ftcore.modules.nf4 import NF4Linear  # lazy: only QLoRA needs the NF4 code

            self.nf4_base = NF4Linear(in_dim, out_dim, bias=False)
            self.register_state_dict_post_hook(_flatten_nf4_keys)
            self.register_load_state_dict_pre_hook(_nest_nf4_keys)
        else:
            self.weight = nn.Parameter(torch.empty(out_dim, in_dim), requires_grad=False)
            # nn.Linear's init, so a standalone layer is sane; a checkpoint load overwrites it.
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.bias = nn.Parameter(torch.zeros(out_dim), requires_grad=False) if use_bias else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_a = nn.Linear(in_dim, rank, bias=False)
        self.lora_b = nn.Linear(rank, out_dim, bias=False)
        self.magnitude = nn.Parameter(torch.ones(out_dim)) if use_dora else None
        self.reset_lora_parameters()
        if use_dora:
            self.initialize_dora_magnitude()

    def reset_lora_parameters(self) -> None:
        """A: Kaiming-uniform (a=sqrt(5)), B: zeros, so the update B A starts at exactly zero."""
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    @torch.no_grad()
    def initialize_dora_magnitude(self) -> None:
        """Set m = ||W0 + s B A||_row. Call after the base weight is loaded (and after B is set)."""
        if not self.use_dora:
            raise ValueError("initialize_dora_magnitude() needs a LoRALinear built with use_dora=True")
        magnitude = cast(nn.Parameter, self.magnitude)  # set with use_dora
        magnitude.copy_(self._adapted_weight().norm(p=2, dim=1).to(magnitude.dtype))

    def base_weight(self) -> torch.Tensor:
        """The frozen weight W0 (out, in) as a plain tensor (dequantized when stored in NF4)."""
        return self.nf4_base.weight_nf4.dequantize(self.nf4_base.dtype) if self.quantize_base else self.weight

    def _lora_delta(self) -> torch.Tensor:
        """s * B @ A, shape (out, in), in fp32 so that merge/unmerge round-trips closely."""
        return self.scaling * (self.lora_b.weight.float() @ self.lora_a.weight.float())

    def _adapted_weight(self) -> torch.Tensor:
        """W0 + s B A in fp32, shape (out, in)."""
        return self.base_weight().float() + self._lora_delta()

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nf4_base(x) if self.quantize_base else F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        if self.merged or self.disabled:
            out = self._base_forward(x)
        elif self.use_dora:
            out = self._base_forward(x)
            lora_out = self.scaling * self.lora_b(self.lora_a(self.dropout(x)))
            # m / ||W0 + s B A||_row with the norm detached (DoRA paper, section 4.3); computed without
            # a graph, so autograd saves no weight-sized tensor for a backward that never runs
            with torch.no_grad():
                weight_norm = self._adapted_weight().norm(p=2, dim=1)
            out = (self.magnitude / weight_norm).to(out.dtype) * (out + lora_out)
        else:
            rows = x.reshape(-1, x.shape[-1])  # (tokens, in)
            if self._fuses_backward(rows):
                base = self.nf4_base.weight_nf4 if self.quantize_base else self.weight
                output_read = not (self.skip_output_in_recompute and is_recomputing())
                out = lora_matmul(
                    rows, base, self.lora_a.weight, self.lora_b.weight, self.scaling, output_read
                )
            else:
                # On rows the base output is a fresh 2-D tensor, which the adapter's product can then be
                # added into in place (see _add_scaled_product).
                hidden = self.lora_a(self.dropout(rows))  # (tokens, rank)
                out = _add_scaled_product(self._base_forward(rows), hidden, self.lora_b.weight, self.scaling)
            out = out.view(*x.shape[:-1], self.out_dim)
        if self.bias is not None:
            out = out + self.bias
        return out

    def _fuses_backward(self, rows: torch.Tensor) -> bool:
        """Whether `lora_matmul` (input gradient in one GEMM) takes this call: eager training, no dropout,
        adapters in the input's dtype and a frozen base (float in that dtype too, or NF4)."""
        dtype = rows.dtype
        if (
            torch.compiler.is_compiling()
            or not torch.is_grad_enabled()
            or not isinstance(self.dropout, nn.Identity)
        ):
            return False
        if not (self.lora_a.weight.dtype == self.lora_b.weight.dtype == dtype):
            return False
        return self.quantize_base or (self.weight.dtype == dtype and not self.weight.requires_grad)

    def merged_weight(self) -> torch.Tensor:
        """The weight that gives this layer's adapted output in one matmul, (out, in), base dtype."""
        base = self.base_weight()
        weight = self._adapted_weight()
        if self.use_dora:
            magnitude = cast(nn.Parameter, self.magnitude)  # set with use_dora
            weight = (magnitude.float() / weight.norm(p=2, dim=1)).unsqueeze(1) * weight
        return weight.to(base.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into `weight` in place; forward then skips the adapter path."""
        if self.merged:
            return
        if self.quantize_base:
            raise ValueError(
                "cannot merge LoRA into an NF4 (quantize_base=True) weight in place: requantizing would "
                "lose the update; use get_merged_state_dict(model) to export a merged float state dict"
            )
        if self.use_dora:
            self._dora_merge_norm = self._adapted_weight().norm(p=2, dim=1)
        self.weight.copy_(self.merged_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): W0 = W' * ||W0 + sBA||_row / m - sBA (DoRA) or W' - sBA (LoRA)."""
        if not self.merged:
            return
        weight = self.weight.float()
        if self.use_dora:
            # both set with use_dora, the norm by merge()
            merge_norm = cast(torch.Tensor, self._dora_merge_norm)
            magnitude = cast(nn.Parameter, self.magnitude)
            weight = weight * (merge_norm / magnitude.float()).unsqueeze(1)
            self._dora_merge_norm = None
        self.weight.copy_((weight - self._lora_delta()).to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, out_dim={self.out_dim}, rank={self.rank}, alpha={self.alpha}, "
            f"quantize_base={self.quantize_base}, use_dora={self.use_dora}"
        )


def _add_scaled_product(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, scale: float):
    """out (tokens, out) + scale * hidden (tokens, rank) @ weight^T, added into `out` in place by one GEMM.

    The scale and the sum run in the GEMM's epilogue, which reads and writes `out`; an out-of-place addmm
    first copies `out` whole (a device memcpy per adapter and pass: ~10 ms of an 8B LoRA step). The base
    GEMM saved only its inputs for backward, so writing into its output is safe, and the backward of
    `out` is the identity. `out` must be that output itself, not a view of it. The plain formula when
    dtypes differ (adapters kept in float32 on a bf16 base) or `out` is not contiguous."""
    if not (out.dtype == hidden.dtype == weight.dtype and out.is_contiguous()):
        return out + scale * F.linear(hidden, weight)
    return out.addmm_(hidden, weight.t(), alpha=scale)


def _flatten_nf4_keys(module, state_dict, prefix, local_metadata) -> None:
    """State-dict hook: `<prefix>nf4_base.weight` (or its NF4 buffers) -> `<prefix>weight`."""
    nested = f"{prefix}nf4_base."
    for key in [k for k in state_dict if k.startswith(nested)]:
        state_dict[prefix + key[len(nested) :]] = state_dict.pop(key)


def _nest_nf4_keys(module, state_dict, prefix, *args) -> None:
    """Load pre-hook: route `<prefix>weight` (float or NF4 parts) to the NF4Linear child."""
    for key in [k for k in state_dict if k.startswith(prefix + "weight")]:
        state_dict[f"{prefix}nf4_base.{key[len(prefix) :]}"] = state_dict.pop(key)


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(qualified name, module) for every LoRALinear in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def get_adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable adapter parameters (lora_a, lora_b, magnitude) by their full names."""
    params = {}
    for prefix, module in lora_modules(model):
        for local_name in ADAPTER_PARAM_NAMES:
            owner_name, _, attr = local_name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            param = getattr(owner, attr)
            if param is not None:
                params[f"{prefix}.{local_name}" if prefix else local_name] = param
    return params


def set_trainable_params(model: nn.Module, adapter_params: Iterable[str]) -> None:
    """Make exactly the named parameters trainable and freeze every other one.

    `adapter_params` is a dict from get_adapter_params() or any iterable of parameter names.
    """
    trainable = set(adapter_params)
    all_names = {name for name, _ in model.named_parameters()}
    unknown = sorted(trainable - all_names)
    if unknown:
        raise ValueError(f"set_trainable_params: these names are not parameters of the model: {unknown[:5]}")
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)


def merge_lora_weights(model: nn.Module) -> None:
    """Fold every adapter into its base weight in place (forward output is unchanged)."""
    for _, module in lora_modules(model):
        module.merge()


def unmerge_lora_weights(model: nn.Module) -> None:
    """Undo merge_lora_weights (restores the base weights up to float rounding)."""
    for _, module in lora_modules(model):
        module.unmerge()


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Within the block, every LoRALinear computes only its base layer (e.g. DPO's reference model)."""
    modules = [module for _, module in lora_modules(model)]
    if any(module.merged for module in modules):
        raise ValueError("disable_adapters: unmerge the adapters first (unmerge_lora_weights(model))")
    previous = [module.disabled for module in modules]
    for module in modules:
        module.disabled = True
    try:
        yield
    finally:
        for module, was_disabled in zip(modules, previous):
            module.disabled = was_disabled


@torch.no_grad()
def get_merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with each adapter folded into its `weight` and the LoRA keys removed.

    The model itself is not modified; NF4 bases are dequantized. Merged weights are new tensors on
    the model's device in the base dtype; all other entries are the model's own tensors.
    """
    state = model.state_dict()
    for prefix, module in lora_modules(model):
        dot = f"{prefix}." if prefix else ""
        # An already merged module holds W' in `weight`; otherwise compute W' without touching W0.
        state[f"{dot}weight"] = module.weight.detach() if module.merged else module.merged_weight()
        for local_name in ADAPTER_PARAM_NAMES:
            state.pop(f"{dot}{local_name}", None)
    return state
