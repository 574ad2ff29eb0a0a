"""CPU micro-benchmark of decoding (run with -s to see the numbers): tokens/s and aten ops per step."""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

import ftcore.models as M


def tiny_llama_1b_heads() -> M.TransformerDecoder:
    """Llama-3.2-1B's depth and head layout (16 layers, 32 query / 8 key-value heads) at a tiny
    width, so that per-op host overhead, the thing the KV-cache path must keep small, dominates."""
    torch.manual_seed(0)
    model = M.tiny_llama(vocab_size=512, dim=256, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=512)
    M.init_weights(model)
    return model.eval()


def decode_seconds(model, prompt, new_tokens: int, **kwargs) -> float:
    """Best of three timed runs after a warm-up: the 2 CPU cores are shared, so one run can stall."""
    M.generate(model, [prompt], new_tokens, **kwargs)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        M.generate(model, [prompt], new_tokens, **kwargs)
        times.append(time.perf_counter() - start)
    return min(times)


def aten_ops(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def test_cached_decoding_speed_on_cpu():
    model = tiny_llama_1b_heads()
    prompt = list(range(1, 33))
    new = 48
    cached = new / decode_seconds(model, prompt, new)
    uncached = new / decode_seconds(model, prompt, new, use_cache=False)
    ops_per_step = (
        aten_ops(lambda: M.generate(model, [prompt], 5)) - aten_ops(lambda: M.generate(model, [prompt], 1))
    ) / 4
    print(
        f"\n[generation, CPU, 16 layers x 32/8 heads, dim 256] cached {cached:.0f} tokens/s, "
        f"uncached {uncached:.0f} tokens/s, {ops_per_step:.0f} aten ops per decode step"
    )
    # without the cache each step reruns the whole prefix (32 to 80 tokens): clearly slower
    assert cached > 1.5 * uncached
