"""Generation with the static KV cache, against Hugging Face `generate` and the no-cache path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ftcore.models as M
from tests.models.helpers import load_ftcore, make_hf_model

PROMPTS = [[5, 17, 42, 9, 3, 77], [8, 2]]


@pytest.fixture(scope="module")
def gqa_pair(tmp_path_factory):
    """A random HF Llama 3.1 (4 query heads share 2 key/value heads) and the same model in ftcore."""
    path = tmp_path_factory.mktemp("llama3_1")
    hf_model = make_hf_model("llama3_1", seed=7)
    hf_model.save_pretrained(path)
    return hf_model, load_ftcore(path)


def hf_greedy(hf_model, prompts, max_new_tokens: int) -> list[list[int]]:
    """HF generate on a left-padded batch (positions come from its attention mask, as in ftcore)."""
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf_model.generate(
            ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[:, longest:].tolist()


def test_left_padded_gqa_batch_matches_hf_generate(gqa_pair):
    hf_model, model = gqa_pair
    assert M.generate(model, PROMPTS, max_new_tokens=10) == hf_greedy(hf_model, PROMPTS, 10)


def test_stop_token_cuts_each_row_like_hf(gqa_pair):
    hf_model, model = gqa_pair
    expected = hf_greedy(hf_model, PROMPTS, 10)
    stop = expected[0][2]  # the third token of row 0
    cut = [row[: row.index(stop)] if stop in row else row for row in expected]
    assert M.generate(model, PROMPTS, max_new_tokens=10, stop_tokens=[stop]) == cut


def test_sampling_with_cache_equals_without(gqa_pair):
    _, model = gqa_pair
    args = dict(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=3)
    with_cache = M.generate(model, PROMPTS, **args)
    assert with_cache == M.generate(model, PROMPTS, use_cache=False, **args)
    assert with_cache != M.generate(model, PROMPTS, max_new_tokens=12)  # it did sample, not argmax


def test_decode_steps_attend_over_one_static_cache_shape(gqa_pair, monkeypatch):
    """Every decode step hands attention the same shapes (the whole preallocated cache), with the
    query heads folded onto the key/value heads instead of `enable_gqa` next to a mask."""
    _, model = gqa_pair
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, **kwargs):
        seen.append(
            (tuple(q.shape), tuple(k.shape), tuple(kwargs["attn_mask"].shape), kwargs.get("enable_gqa"))
        )
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    M.generate(model, PROMPTS, max_new_tokens=9)
    n_layers = len(model.layers)
    decode = seen[n_layers:]  # after the prefill forward
    assert len(decode) == 8 * n_layers
    assert len(set(decode)) == 1
    q_shape, k_shape, mask_shape, enable_gqa = decode[0]
    cache_len = k_shape[2]
    assert cache_len % M.generation.CACHE_ALIGN == 0 and cache_len >= 6 + 9
    assert q_shape == (2, 2, 2, 16)  # (B, n_kv_heads, group * T, head_dim) with group 2, T 1
    assert mask_shape == (2, 1, 1, cache_len) and not enable_gqa


def test_rope_angles_are_computed_once_per_forward(gqa_pair, monkeypatch):
    _, model = gqa_pair
    calls = []
    cos = torch.Tensor.cos
    monkeypatch.setattr(torch.Tensor, "cos", lambda t: calls.append(1) or cos(t))
    with torch.no_grad():
        model(torch.tensor([PROMPTS[0]]))
    assert len(calls) == 1  # not 2 * n_layers
    positions = torch.arange(6)[None]
    with torch.no_grad():
        model(torch.tensor([PROMPTS[0]]), input_pos=positions)
        positions += 3  # an in-place change of the same tensor must not reuse the old angles
        shifted = model(torch.tensor([PROMPTS[0]]), input_pos=positions)
        expected = model(torch.tensor([PROMPTS[0]]), input_pos=torch.arange(3, 9)[None])
    assert torch.equal(shifted, expected)


def test_cache_errors_name_the_fix():
    model = M.tiny_llama(vocab_size=64, n_layers=1).eval()
    M.init_weights(model)
    model.setup_cache(1, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="larger max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="must cover all 8 cache slots"):
        model(torch.zeros(1, 2, dtype=torch.long), mask=torch.ones(1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        M.generate(model, [[1]], max_new_tokens=0)


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens(gqa_pair):
    """`compile=True` (torch.compile, CUDA graphs on GPU) changes speed, not the greedy tokens."""
    hf_model, model = gqa_pair
    assert M.generate(model, PROMPTS, max_new_tokens=6, compile=True) == hf_greedy(hf_model, PROMPTS, 6)
