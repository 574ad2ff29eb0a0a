"""Autoregressive sampling with the KV cache: greedy, temperature, top-k, top-p, stop tokens.

Prompts of different lengths are left-padded; each row keeps its own RoPE positions and a mask
that hides its padding, so a batch decodes exactly as each prompt would alone.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from ftcore.models.transformer import TransformerDecoder
from ftcore.modules.host_embedding import compute_device


def check_max_new_tokens(max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse settings that sample nothing or everything, naming the config key."""
    if temperature < 0:
        raise ValueError(f"config key `temperature` must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"config key `top_k` must be >= 1 or null (off), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"config key `top_p` must be in (0, 1] or null (off), got {top_p}")


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, vocab) -> next token ids (B,). temperature 0 means greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_best = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    probs = logits.softmax(dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _slot_mask(pad_lengths: torch.Tensor, query_slots: torch.Tensor, n_slots: int) -> torch.Tensor:
    """(B, T, n_slots) bool: a query in slot q sees slots s with pad <= s <= q; a padding query
    sees only itself (so no row of the attention is empty)."""
    slots = torch.arange(n_slots, device=pad_lengths.device)
    causal = slots[None, None, :] <= query_slots[None, :, None]  # (1, T, S)
    not_padding = slots[None, None, :] >= pad_lengths[:, None, None]  # (B, 1, S)
    itself = slots[None, None, :] == query_slots[None, :, None]
    return (causal & not_padding) | itself


# Checking "have all rows stopped?" reads a device flag on the host, a sync that stops the host from
# queueing the next steps while the device works; checking every few steps keeps the queue full. Steps
# taken after every row stopped only write padding, which the output drops.
STOP_CHECK_EVERY = 4
# Cache lengths are rounded up to a multiple of this, so every mask row (one per cache slot) is
# aligned for the fused attention kernels, which otherwise pad the mask on every call.
CACHE_ALIGN = 16


@torch.no_grad()
def generate(
    model: TransformerDecoder,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    seed: int | None = None,
    use_cache: bool = True,
    compile: bool = False,
) -> list[list[int]]:
    """Generate up to `max_new_tokens` after each prompt; returns the new tokens of each row, cut
    before the first stop token. `use_cache=False` recomputes the whole sequence every step (slow,
    the reference the cache is tested against). `compile=True` runs each decode step through
    `torch.compile(mode="reduce-overhead")` (CUDA graphs on GPU; the first call compiles)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError(
            "generate needs at least one prompt and every prompt needs at least one token (e.g. BOS)"
        )
    check_max_new_tokens(max_new_tokens)
    check_sampling(temperature, top_k, top_p)
    device = compute_device(model)  # not the embedding's: offload_embedding keeps it in host memory
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    sampler = functools.partial(
        sample_next, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
    )
    batch = _Batch.left_padded(prompts, max_new_tokens, pad_id, device)
    stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    if use_cache:
        end = _decode_with_cache(model, batch, sampler, stops, compile)
    else:
        end = _decode_without_cache(model, batch, sampler, stops)
    new_tokens = batch.tokens[:, batch.prompt_len : end].tolist()
    return [_cut_at_stop(row, stop_tokens) for row in new_tokens]


class _Batch:
    """Left-padded prompts with room for the new tokens; row b's padding is its first pad[b] slots."""

    def __init__(self, tokens, positions, pad_lengths, prompt_len: int, pad_id: int):
        self.tokens = tokens  # (B, L) prompt then new tokens, L = longest prompt + max_new_tokens
        self.positions = positions  # (B, L) RoPE positions, 0 at each row's first real token
        self.pad_lengths = pad_lengths  # (B,)
        self.prompt_len = prompt_len
        self.pad_id = pad_id

    @classmethod
    def left_padded(cls, prompts, max_new_tokens: int, pad_id: int, device) -> _Batch:
        longest = max(len(p) for p in prompts)
        total_len = longest + max_new_tokens
        tokens = torch.full((len(prompts), total_len), pad_id, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            tokens[row, longest - len(prompt) : longest] = torch.tensor(list(prompt), device=device)
        pad_lengths = torch.tensor([longest - len(p) for p in prompts], device=device)
        slots = torch.arange(total_len, device=device)
        positions = (slots[None, :] - pad_lengths[:, None]).clamp(min=0)  # (B, L)
        return cls(tokens, positions, pad_lengths, longest, pad_id)

    @property
    def total_len(self) -> int:
        return self.tokens.shape[1]

    def append(self, slot: int, next_token: torch.Tensor, done: torch.Tensor, stops: torch.Tensor) -> None:
        """Write the sampled (B,) tokens at `slot` (padding for finished rows), then mark new stops."""
        self.tokens[:, slot] = torch.where(done, self.pad_id, next_token)
        done |= torch.isin(next_token, stops)


def _decode_with_cache(model, batch: _Batch, sampler, stops: torch.Tensor, compile: bool) -> int:
    """Prefill the prompts in one forward, then one token per forward; returns the end slot."""
    device = batch.tokens.device
    cache_len = -(-batch.total_len // CACHE_ALIGN) * CACHE_ALIGN
    slots = torch.arange(cache_len, device=device)
    not_padding = slots[None, :] >= batch.pad_lengths[:, None]  # (B, S_cache)
    step = _compiled_decode_step() if compile else _decode_step
    model.setup_cache(len(batch.tokens), cache_len, model.tok_embeddings.weight.dtype, device)
    try:
        prompt = slice(0, batch.prompt_len)
        mask = _slot_mask(batch.pad_lengths, slots[prompt], cache_len)  # (B, T, S_cache)
        hidden = model.hidden(
            batch.tokens[:, prompt], input_pos=batch.positions[:, prompt], mask=mask, cache_pos=slots[prompt]
        )
        next_token = sampler(model.logits(hidden[:, -1]))  # only the last position needs logits
        done = torch.zeros(len(batch.tokens), dtype=torch.bool, device=device)
        for slot in range(batch.prompt_len, batch.total_len):
            batch.append(slot, next_token, done, stops)
            if slot + 1 == batch.total_len or _all_stopped(done, stops, slot - batch.prompt_len):
                return slot + 1
            # slice views of precomputed tensors: no host-to-device copies inside the loop
            logits = step(
                model,
                batch.tokens[:, slot : slot + 1],
                batch.positions[:, slot : slot + 1],
                slots[slot : slot + 1],
                slots,
                not_padding,
            )
            next_token = sampler(logits)
        return batch.total_len
    finally:
        model.remove_cache()


def _decode_step(model, token, input_pos, cache_pos, slots, not_padding) -> torch.Tensor:
    """One token per row: token, input_pos (B, 1); cache_pos (1,) -> next-token logits (B, vocab).
    The new token's slot is after every row's padding, so it sees its row's real slots up to itself."""
    mask = (slots[None, :] <= cache_pos) & not_padding  # (B, S_cache)
    return model(token, input_pos=input_pos, mask=mask[:, None], cache_pos=cache_pos)[:, -1]


_COMPILED_STEP = None


def _compiled_decode_step():
    """`_decode_step` compiled once per process (shapes are static, so CUDA graphs replay it)."""
    global _COMPILED_STEP
    if _COMPILED_STEP is None:
        _COMPILED_STEP = torch.compile(_decode_step, mode="reduce-overhead", fullgraph=True)
    return _COMPILED_STEP


def _all_stopped(done: torch.Tensor, stops: torch.Tensor, step: int) -> bool:
    return stops.numel() > 0 and step % STOP_CHECK_EVERY == 0 and bool(done.all())


def _decode_without_cache(model, batch: _Batch, sampler, stops: torch.Tensor) -> int:
    """The reference: every step runs the whole sequence so far; returns the end slot."""
    device = batch.tokens.device
    done = torch.zeros(len(batch.tokens), dtype=torch.bool, device=device)
    for slot in range(batch.prompt_len, batch.total_len):
        seen = slice(0, slot)
        mask = _slot_mask(batch.pad_lengths, torch.arange(slot, device=device), slot)  # (B, slot, slot)
        logits = model(batch.tokens[:, seen], input_pos=batch.positions[:, seen], mask=mask)
        batch.append(slot, sampler(logits[:, -1]), done, stops)
        if stops.numel() > 0 and bool(done.all()):
            return slot + 1
    return batch.total_len


def _cut_at_stop(ids: list[int], stop_tokens: Sequence[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in stop_tokens:
            return ids[:i]
    return ids
