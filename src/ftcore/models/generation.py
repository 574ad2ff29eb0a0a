"""Autoregressive sampling with the KV cache: greedy, temperature, top-k, top-p, stop tokens.

Prompts of different lengths are left-padded; each row keeps its own RoPE positions and a mask
that hides its padding, so a batch decodes exactly as each prompt would alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ftcore.models.transformer import TransformerDecoder


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
) -> list[list[int]]:
    """Generate up to `max_new_tokens` after each prompt; returns the new tokens of each row, cut
    before the first stop token. `use_cache=False` recomputes the whole sequence every step (slow,
    the reference the cache is tested against)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError(
            "generate needs at least one prompt and every prompt needs at least one token (e.g. BOS)"
        )
    device = model.tok_embeddings.weight.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    longest = max(len(p) for p in prompts)
    total_len = longest + max_new_tokens
    tokens = torch.full((len(prompts), total_len), pad_id, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt) : longest] = torch.tensor(list(prompt), device=device)
    pad_lengths = torch.tensor([longest - len(p) for p in prompts], device=device)
    positions = (torch.arange(total_len, device=device)[None, :] - pad_lengths[:, None]).clamp(
        min=0
    )  # (B, L)

    if use_cache:
        model.setup_cache(len(prompts), total_len, model.tok_embeddings.weight.dtype, device)
    try:
        done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
        start = 0
        for end in range(longest, total_len):
            if use_cache:
                window = slice(start, end)  # only the slots not yet in the cache
                mask = _slot_mask(pad_lengths, torch.arange(start, end, device=device), end)
            else:
                window = slice(0, end)
                mask = _slot_mask(pad_lengths, torch.arange(0, end, device=device), end)
            logits = model(tokens[:, window], input_pos=positions[:, window], mask=mask)
            next_token = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
            tokens[:, end] = torch.where(done, pad_id, next_token)
            done |= torch.isin(next_token, stops)
            start = end
            if done.all():
                total_len = end + 1
                break
    finally:
        if use_cache:
            model.remove_cache()
    return [_cut_at_stop(tokens[row, longest:total_len].tolist(), stop_tokens) for row in range(len(prompts))]


def _cut_at_stop(ids: list[int], stop_tokens: Sequence[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in stop_tokens:
            return ids[:i]
    return ids
