"""One readable Llama-family decoder: embedding, N x (RMSNorm, GQA attention with RoPE, RMSNorm,
SwiGLU MLP), final RMSNorm, output projection (optionally tied to the embedding).

Weights use the Hugging Face layout: RoPE rotates the two halves of each head ("rotate half"),
so HF checkpoints load by renaming only; Meta and GGUF loaders permute q/k on the way in.

The model is meant to be built on the meta device and materialized with `model.to_empty(...)`;
`init_weights(model)` (or a checkpointer, which calls `reset_buffers`) then fills it. The RoPE
frequencies are a non-persistent float32 buffer, so they never enter a checkpoint and are
recomputed by `reset_buffers` after materialization.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast, overload

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's RoPE frequency scaling: long wavelengths are divided by `factor`, short ones are
    kept, and the band between is interpolated smoothly (Meta's llama3.1 reference code)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


def rope_inverse_frequencies(
    head_dim: int, base: float, scaling: Llama3RopeScaling | None = None
) -> torch.Tensor:
    """Return the (head_dim // 2,) float32 inverse frequencies theta_i = base^(-2i / head_dim)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (base**exponents)
    if scaling is None:
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    # smooth = 0 at the low-frequency edge (fully scaled), 1 at the high-frequency edge (kept)
    smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, interpolated, scaled)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the "rotate half" layout: dims i and i + head_dim/2 of each head
    form one rotating pair. Angles are computed from explicit positions, so packed sequences
    (positions restarting per document) and cached generation need no precomputed table."""

    inv_freq: torch.Tensor  # registered buffer

    def __init__(self, head_dim: int, base: float = 10_000.0, scaling: Llama3RopeScaling | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        self.scaling = scaling
        self.register_buffer("inv_freq", torch.empty(head_dim // 2, dtype=torch.float32), persistent=False)
        self.angle_memo = AngleMemo()  # shared by identical ropes of one decoder (TransformerDecoder)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        if self.inv_freq.is_meta:
            return
        self.angle_memo.key = None
        inv_freq = rope_inverse_frequencies(self.head_dim, self.base, self.scaling)
        # to_empty() may have cast the buffer; the frequencies are always kept in float32
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """x: (B, n_heads, T, head_dim); input_pos: (B, T) -> same shape as x, rotated."""
        cos, sin = self.cos_sin(input_pos, x.dtype)  # (B, 1, T, head_dim) each
        first, second = x.chunk(2, dim=-1)
        rotated_half = torch.cat((-second, first), dim=-1)
        return x * cos + rotated_half * sin

    def cos_sin(self, input_pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotation for positions (B, T), memoized: q and k of every layer rotate by the same
        positions within one forward, so the angles are computed once, not 2 * n_layers times (a
        decode step is launch-bound; this saves ~16 small kernels per layer). The key includes the
        tensor's version counter, so an in-place change of `input_pos` invalidates it."""
        compiling = torch.compiler.is_compiling()  # inside a compiled graph the angles fuse anyway
        key = (input_pos, input_pos._version, dtype)
        memo = self.angle_memo
        if not compiling and memo.key is not None and memo.key[0] is key[0] and memo.key[1:] == key[1:]:
            return memo.cos, memo.sin
        angles = input_pos[:, None, :, None].float() * self.inv_freq.float()  # (B, 1, T, head_dim/2)
        angles = torch.cat((angles, angles), dim=-1)  # (B, 1, T, head_dim)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        if not compiling:
            memo.key, memo.cos, memo.sin = key, cos, sin
        return cos, sin


class AngleMemo:
    """The last (positions, dtype) -> (cos, sin) of one or more identical RotaryEmbeddings."""

    def __init__(self):
        self.key, self.cos, self.sin = None, None, None


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 (as HF and Meta do)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class KVCache(nn.Module):
    """Static keys and values for generation, preallocated at the full cache length.

    Each forward writes its new keys at explicit slot indices (`cache_pos`, a tensor, so no host
    arithmetic or sync is needed) and attention always reads the whole buffer, with unfilled slots
    masked out. Shapes therefore never change between decode steps: fused attention kernels keep
    their cached plans (a key length that grows every step makes cuDNN/flash re-plan each call) and
    the decode step can be captured in a CUDA graph. The RoPE position of a token is separate
    (`input_pos`), so left-padded batches keep correct positions."""

    k_cache: torch.Tensor  # registered buffers
    v_cache: torch.Tensor

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_seq_len(self) -> int:
        return self.k_cache.shape[2]

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()

    def update(
        self, cache_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cache_pos (T,) slots; k, v (B, n_kv_heads, T, head_dim) -> whole caches (B, n_kv_heads, S, head_dim)."""
        self.k_cache.index_copy_(2, cache_pos, k.to(self.k_cache.dtype))
        self.v_cache.index_copy_(2, cache_pos, v.to(self.v_cache.dtype))
        return self.k_cache, self.v_cache


class Attention(nn.Module):
    """Grouped-query self-attention: n_heads query heads share n_kv_heads key/value heads."""

    def __init__(
        self,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        q_proj: nn.Module,
        k_proj: nn.Module,
        v_proj: nn.Module,
        output_proj: nn.Module,
        rope: RotaryEmbedding,
    ):
        super().__init__()
        if n_heads % n_kv_heads != 0:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj, self.k_proj, self.v_proj, self.output_proj = q_proj, k_proj, v_proj, output_proj
        self.rope = rope
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        input_pos: torch.Tensor,
        mask: torch.Tensor | None,
        cache_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, T, dim); input_pos: (B, T); mask: (B, T, S) bool or None (causal).
        With a KV cache: cache_pos (T,) slots to write and mask (B or 1, T, S_cache), bool or additive."""
        batch, seq_len, _ = x.shape
        q = self.q_proj(x).view(batch, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # q: (B, n_heads, T, head_dim); k, v: (B, n_kv_heads, T, head_dim)
        q, k = self.rope(q, input_pos), self.rope(k, input_pos)

        if self.kv_cache is not None:
            if cache_pos is None or mask is None:  # TransformerDecoder.hidden always passes both
                raise ValueError("Attention with a KV cache needs cache_pos and mask")
            k, v = self.kv_cache.update(cache_pos, k, v)  # (B, n_kv_heads, S_cache, head_dim)
            out = self._grouped_attention(q, k, v, mask)
        else:
            attn_mask = None if mask is None else mask[:, None]  # (B, 1, T, S) broadcast over heads
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                is_causal=mask is None,
                enable_gqa=self.n_heads != self.n_kv_heads,
            )
        # out: (B, n_heads, T, head_dim)
        out = out.transpose(1, 2).reshape(batch, seq_len, self.n_heads * self.head_dim)
        return self.output_proj(out)

    def _grouped_attention(self, q, k, v, mask: torch.Tensor) -> torch.Tensor:
        """Masked GQA over the cache without `enable_gqa`: the query heads sharing one key/value head
        are folded into the query-length axis. GQA together with a mask has no fused kernel on some
        CUDA builds (it falls back to the unfused math path); folded, any masked kernel applies, and
        at decode (T = 1) the fold is a free view.
        q: (B, n_heads, T, head_dim); k, v: (B, n_kv_heads, S, head_dim); mask: (B or 1, T, S)."""
        batch, _, seq_len, _ = q.shape
        group = self.n_heads // self.n_kv_heads
        # head h uses key/value head h // group (HF's repeat_kv order), so the group axis follows it
        q = q.reshape(batch, self.n_kv_heads, group * seq_len, self.head_dim)  # (B, n_kv, group*T, hd)
        mask = mask[:, None]  # (B, 1, T, S)
        if seq_len > 1 and group > 1:
            # row g*T + t of the folded query is query t of group member g
            mask = mask[:, :, None].expand(-1, -1, group, -1, -1).flatten(2, 3)  # (B, 1, group*T, S)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, n_kv, group*T, hd)
        return out.reshape(batch, self.n_heads, seq_len, self.head_dim)


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x), w1 = gate, w3 = up, w2 = down."""

    def __init__(self, w1: nn.Module, w2: nn.Module, w3: nn.Module):
        super().__init__()
        self.w1, self.w2, self.w3 = w1, w2, w3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block; the unit of activation checkpointing and FSDP sharding."""

    def __init__(self, attn: Attention, mlp: FeedForward, attn_norm: RMSNorm, mlp_norm: RMSNorm):
        super().__init__()
        self.attn, self.mlp, self.attn_norm, self.mlp_norm = attn, mlp, attn_norm, mlp_norm

    def forward(
        self,
        x: torch.Tensor,
        input_pos: torch.Tensor,
        mask: torch.Tensor | None,
        cache_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = x + self.attn(self.attn_norm(x), input_pos, mask, cache_pos)
        return h + self.mlp(self.mlp_norm(h))

    def closing_projection(self) -> nn.Module | None:
        """The layer whose output feeds nothing but the residual add that makes the block's output: the
        MLP's down projection (also under ftcore's fused and chunked MLP forwards, which keep w2 last)."""
        return self.mlp.w2 if type(self.mlp) is FeedForward else None


if TYPE_CHECKING:
    from ftcore.kernels.nf4_reference import NF4Parts

    class _Blocks(nn.ModuleList):
        """For the type checker only: `TransformerDecoder.layers` is an nn.ModuleList of TransformerBlocks."""

        @overload
        def __getitem__(self, idx: slice) -> nn.ModuleList: ...
        @overload
        def __getitem__(self, idx: int) -> TransformerBlock: ...
        def __getitem__(self, idx: int | slice) -> TransformerBlock | nn.ModuleList: ...
        def __iter__(self) -> Iterator[TransformerBlock]: ...

    class _NF4Init(Protocol):
        """What `init_weights` uses of an NF4Linear (found by its `set_weight`)."""

        weight_packed: torch.Tensor
        out_dim: int
        in_dim: int

        def set_weight(self, weight: NF4Parts) -> None: ...

    class _LoRAInit(Protocol):
        def reset_lora_parameters(self) -> None: ...


class TransformerDecoder(nn.Module):
    """The decoder. `output=None` ties the output projection to the token embedding."""

    layers: _Blocks

    def __init__(
        self,
        tok_embeddings: nn.Embedding,
        layers: list[TransformerBlock],
        norm: RMSNorm,
        output: nn.Module | None,
        max_seq_len: int,
    ):
        super().__init__()
        self.tok_embeddings = tok_embeddings
        self.layers = cast("_Blocks", nn.ModuleList(layers))
        self.norm = norm
        self.output = output
        self.max_seq_len = max_seq_len
        self._next_slot = 0  # the first cache slot not yet written (host int, no sync to read it)
        _share_angle_memos(self.layers)

    @property
    def tied_embeddings(self) -> bool:
        return self.output is None

    @property
    def output_weight(self) -> torch.Tensor:
        """The (vocab, dim) output projection weight (the embedding when tied), for chunked losses."""
        return self.tok_embeddings.weight if self.output is None else cast(torch.Tensor, self.output.weight)

    def setup_cache(self, batch_size: int, max_seq_len: int, dtype: torch.dtype, device) -> None:
        for layer in self.layers:
            attn = layer.attn
            attn.kv_cache = KVCache(batch_size, max_seq_len, attn.n_kv_heads, attn.head_dim, dtype, device)
        self._next_slot = 0

    def reset_cache(self) -> None:
        for layer in self.layers:
            if layer.attn.kv_cache is not None:
                layer.attn.kv_cache.reset()
        self._next_slot = 0

    def remove_cache(self) -> None:
        for layer in self.layers:
            layer.attn.kv_cache = None
        self._next_slot = 0

    def caches_are_enabled(self) -> bool:
        return self.layers[0].attn.kv_cache is not None

    def _cache_inputs(self, tokens: torch.Tensor, cache_pos, mask):
        """Slots to write (T,) and the additive mask (B or 1, T, S_cache) every layer shares.

        Without `cache_pos` the next free slots are used (tracked on the host); without `mask`,
        query slot p sees slots <= p. The bool mask becomes additive (0 / -inf) once per forward,
        not once per layer inside attention."""
        cache = self.layers[0].attn.kv_cache
        if cache is None:  # called only when caches_are_enabled()
            raise ValueError("no KV cache: call setup_cache first")
        seq_len, cache_len = tokens.shape[1], cache.max_seq_len
        if cache_pos is None:
            if self._next_slot + seq_len > cache_len:
                raise ValueError(
                    f"KV cache overflow: {self._next_slot} + {seq_len} tokens > cache length {cache_len}; "
                    "call setup_cache with a larger max_seq_len"
                )
            cache_pos = torch.arange(self._next_slot, self._next_slot + seq_len, device=tokens.device)
            self._next_slot += seq_len
        if mask is None:
            slots = torch.arange(cache_len, device=tokens.device)
            mask = (slots[None, :] <= cache_pos[:, None])[None]  # (1, T, S_cache)
        elif mask.shape[-1] != cache_len:
            raise ValueError(
                f"with a KV cache the mask must cover all {cache_len} cache slots (B, T, {cache_len}), "
                f"got shape {tuple(mask.shape)}"
            )
        if mask.dtype == torch.bool:
            mask = torch.where(mask, 0.0, float("-inf")).to(cache.k_cache.dtype)
        return cache_pos, mask

    def hidden(self, tokens: torch.Tensor, input_pos=None, mask=None, cache_pos=None) -> torch.Tensor:
        """tokens (B, T) -> final-normed hidden states (B, T, dim). With a KV cache, `cache_pos` (T,)
        names the slots to write (default: the next free ones) and `mask` covers all cache slots."""
        if self.caches_are_enabled():
            cache_pos, mask = self._cache_inputs(tokens, cache_pos, mask)
            if input_pos is None:
                input_pos = cache_pos[None].expand(tokens.shape[0], -1)  # (B, T)
        elif input_pos is None:
            input_pos = torch.arange(tokens.shape[1], device=tokens.device)[None].expand(tokens.shape[0], -1)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, input_pos, mask, cache_pos)
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, *, input_pos=None, mask=None, cache_pos=None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab) in float32."""
        return self.logits(self.hidden(tokens, input_pos=input_pos, mask=mask, cache_pos=cache_pos))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., dim) -> float32 logits (..., vocab) through the (possibly tied) output."""
        logits = F.linear(h, self.tok_embeddings.weight) if self.output is None else self.output(h)
        return logits.float()


def _share_angle_memos(layers: _Blocks) -> None:
    """Let every layer's rope reuse the angles the first computed, when their settings are equal."""
    first = layers[0].attn.rope if len(layers) else None
    for layer in layers:
        rope = layer.attn.rope
        assert first is not None  # the loop runs only when there is a first layer
        if (rope.head_dim, rope.base, rope.scaling) == (first.head_dim, first.base, first.scaling):
            rope.angle_memo = first.angle_memo


def reset_buffers(model: nn.Module) -> None:
    """Recompute every non-persistent buffer (RoPE frequencies) after `to_empty` materialization."""
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_buffers()


def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """Randomly initialize a materialized model: normal(0, std) linears and embeddings (HF's
    `initializer_range`), ones for norms, random NF4 bases, LoRA adapters by their own rule
    (B = 0, so a fresh adapter changes nothing), and recompute buffers. Call it before a
    checkpointer load, which then overwrites the base weights it holds."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
            elif hasattr(module, "set_weight"):  # NF4Linear: quantize a random float weight
                # drawn on the module's device: an 8B model's worth of CPU randn took minutes
                from ftcore.modules.nf4 import random_nf4  # lazy: only QLoRA loads the NF4 kernels

                nf4 = cast("_NF4Init", module)
                nf4.set_weight(random_nf4(nf4.out_dim, nf4.in_dim, std, nf4.weight_packed.device))
            elif isinstance(getattr(module, "weight", None), nn.Parameter):  # LoRALinear's float base
                nn.init.normal_(cast(nn.Parameter, module.weight), mean=0.0, std=std)
            if isinstance(getattr(module, "bias", None), nn.Parameter):
                nn.init.zeros_(cast(nn.Parameter, module.bias))
        # after the pass above, which also touched the adapters' inner nn.Linear layers
        for module in model.modules():
            if hasattr(module, "reset_lora_parameters"):
                cast("_LoRAInit", module).reset_lora_parameters()
    reset_buffers(model)
