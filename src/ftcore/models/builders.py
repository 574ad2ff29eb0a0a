"""Turn flat, typed size arguments into a `TransformerDecoder`, with or without LoRA.

`transformer_decoder` builds the plain model; `lora_transformer_decoder` swaps the targeted
projections for `ftcore.modules.lora.LoRALinear`. Family sizes live in `families.py` as literal
data and are bound to these two functions with `functools.partial`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ftcore.kernels.nf4_reference import NF4_BLOCK_SIZE
from ftcore.models.transformer import (
    Attention,
    FeedForward,
    Llama3RopeScaling,
    RMSNorm,
    RotaryEmbedding,
    TransformerBlock,
    TransformerDecoder,
)

LORA_ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "output_proj")

log = logging.getLogger("ftcore")


@dataclass(frozen=True)
class LoraSettings:
    """Which projections get adapters, and the adapter hyper-parameters."""

    attn_modules: tuple[str, ...] = ()
    apply_to_mlp: bool = False
    apply_to_output: bool = False
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_dora: bool = False


def _linear(in_dim: int, out_dim: int, bias: bool, use_lora: bool, lora: LoraSettings | None, quantize: bool):
    """One projection: LoRALinear when targeted, NF4Linear when only the base is quantized."""
    if use_lora:
        if lora is None:  # the callers target a projection only when given LoRA settings
            raise ValueError("a LoRA projection needs LoRA settings")
        from ftcore.modules.lora import LoRALinear

        return LoRALinear(
            in_dim,
            out_dim,
            rank=lora.rank,
            alpha=lora.alpha,
            dropout=lora.dropout,
            use_bias=bias,
            quantize_base=quantize,
            use_dora=lora.use_dora,
        )
    if quantize:
        from ftcore.modules.nf4 import NF4Linear

        return NF4Linear(in_dim, out_dim, bias=bias)
    return nn.Linear(in_dim, out_dim, bias=bias)


def transformer_decoder(
    *,
    vocab_size: int,
    dim: int,
    n_layers: int,
    n_heads: int,
    n_kv_heads: int,
    hidden_dim: int,
    max_seq_len: int,
    rope_base: float = 10_000.0,
    norm_eps: float = 1e-5,
    tie_embeddings: bool = False,
    qkv_bias: bool = False,
    head_dim: int | None = None,
    rope_scaling: Llama3RopeScaling | None = None,
    quantize_base: bool = False,
    lora: LoraSettings | None = None,
) -> TransformerDecoder:
    """Build the decoder. `quantize_base` stores the frozen block projections in NF4 (QLoRA);
    the embedding and output projection stay in floating point."""
    head_dim = head_dim if head_dim is not None else dim // n_heads
    targets = set(lora.attn_modules) if lora else set()
    mlp_lora = bool(lora and lora.apply_to_mlp)
    kept_float: set[str] = set()

    def proj(name: str, in_dim: int, out_dim: int, use_lora: bool, bias: bool = False) -> nn.Module:
        # NF4 blocks of 64 run along a row; a row of another length keeps its frozen base in float
        quantize = quantize_base and in_dim % NF4_BLOCK_SIZE == 0
        if quantize_base and not quantize:
            kept_float.add(f"{name} (in_dim {in_dim})")
        return _linear(in_dim, out_dim, bias, use_lora, lora, quantize)

    layers = []
    for _ in range(n_layers):
        attn = Attention(
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            q_proj=proj("q_proj", dim, n_heads * head_dim, "q_proj" in targets, qkv_bias),
            k_proj=proj("k_proj", dim, n_kv_heads * head_dim, "k_proj" in targets, qkv_bias),
            v_proj=proj("v_proj", dim, n_kv_heads * head_dim, "v_proj" in targets, qkv_bias),
            output_proj=proj("output_proj", n_heads * head_dim, dim, "output_proj" in targets),
            rope=RotaryEmbedding(head_dim, rope_base, rope_scaling),
        )
        mlp = FeedForward(
            w1=proj("w1", dim, hidden_dim, mlp_lora),
            w2=proj("w2", hidden_dim, dim, mlp_lora),
            w3=proj("w3", dim, hidden_dim, mlp_lora),
        )
        layers.append(TransformerBlock(attn, mlp, RMSNorm(dim, norm_eps), RMSNorm(dim, norm_eps)))
    if kept_float:
        log.warning(
            "quantize_base: NF4 needs rows of a multiple of %d weights; the frozen base of %s stays in floating "
            "point in every block (the other projections are NF4)",
            NF4_BLOCK_SIZE,
            ", ".join(sorted(kept_float)),
        )

    output = None
    if not tie_embeddings:
        output = _linear(dim, vocab_size, False, bool(lora and lora.apply_to_output), lora, False)
    return TransformerDecoder(
        nn.Embedding(vocab_size, dim), layers, RMSNorm(dim, norm_eps), output, max_seq_len
    )


def lora_transformer_decoder(
    lora_attn_modules: Sequence[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    quantize_base: bool = False,
    use_dora: bool = False,
    *,
    vocab_size: int,
    dim: int,
    n_layers: int,
    n_heads: int,
    n_kv_heads: int,
    hidden_dim: int,
    max_seq_len: int,
    rope_base: float = 10_000.0,
    norm_eps: float = 1e-5,
    tie_embeddings: bool = False,
    qkv_bias: bool = False,
    head_dim: int | None = None,
    rope_scaling: Llama3RopeScaling | None = None,
) -> TransformerDecoder:
    """`transformer_decoder` with LoRA adapters on the named attention projections
    (any of q_proj, k_proj, v_proj, output_proj), optionally the MLP and the output projection.

    The sizes are spelled out (no **kwargs) so that config validation can name a misspelt key."""
    sizes: dict[str, Any] = dict(
        vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
        hidden_dim=hidden_dim, max_seq_len=max_seq_len, rope_base=rope_base, norm_eps=norm_eps,
        tie_embeddings=tie_embeddings, qkv_bias=qkv_bias, head_dim=head_dim, rope_scaling=rope_scaling,
    )  # fmt: skip
    if isinstance(lora_attn_modules, str):  # a string is a sequence too: of its characters
        raise ValueError(
            f"lora_attn_modules must be a list of projection names, e.g. [{lora_attn_modules}]; got the string "
            f"{lora_attn_modules!r}"
        )
    unknown = sorted(set(lora_attn_modules) - set(LORA_ATTN_MODULES))
    if unknown:
        raise ValueError(
            f"lora_attn_modules has unknown entries {unknown}; choose from {list(LORA_ATTN_MODULES)}"
        )
    if apply_lora_to_output and sizes.get("tie_embeddings", False):
        raise ValueError(
            "apply_lora_to_output=True needs an untied output projection, but this model ties it to the "
            "embedding; set apply_lora_to_output=False"
        )
    lora = LoraSettings(
        attn_modules=tuple(lora_attn_modules),
        apply_to_mlp=apply_lora_to_mlp,
        apply_to_output=apply_lora_to_output,
        rank=lora_rank,
        alpha=lora_alpha,
        dropout=lora_dropout,
        use_dora=use_dora,
    )
    return transformer_decoder(quantize_base=quantize_base, lora=lora, **sizes)


def tiny_llama(
    vocab_size: int = 512,
    dim: int = 64,
    n_layers: int = 2,
    n_heads: int = 8,
    n_kv_heads: int = 4,
    hidden_dim: int = 172,
    max_seq_len: int = 512,
    tie_embeddings: bool = True,
    rope_base: float = 10_000.0,
    norm_eps: float = 1e-5,
    qkv_bias: bool = False,
    quantize_base: bool = False,
) -> TransformerDecoder:
    """A small Llama with explicit sizes, for tests and the CPU demo."""
    return transformer_decoder(
        vocab_size=vocab_size,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        hidden_dim=hidden_dim,
        max_seq_len=max_seq_len,
        tie_embeddings=tie_embeddings,
        rope_base=rope_base,
        norm_eps=norm_eps,
        qkv_bias=qkv_bias,
        quantize_base=quantize_base,
    )


def lora_tiny_llama(
    lora_attn_modules: Sequence[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    quantize_base: bool = False,
    use_dora: bool = False,
    vocab_size: int = 512,
    dim: int = 64,
    n_layers: int = 2,
    n_heads: int = 8,
    n_kv_heads: int = 4,
    hidden_dim: int = 172,
    max_seq_len: int = 512,
    tie_embeddings: bool = True,
    rope_base: float = 10_000.0,
    norm_eps: float = 1e-5,
) -> TransformerDecoder:
    """`tiny_llama` with LoRA adapters (see `lora_transformer_decoder`)."""
    return lora_transformer_decoder(
        lora_attn_modules,
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        quantize_base=quantize_base,
        use_dora=use_dora,
        vocab_size=vocab_size,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        hidden_dim=hidden_dim,
        max_seq_len=max_seq_len,
        tie_embeddings=tie_embeddings,
        rope_base=rope_base,
        norm_eps=norm_eps,
    )
