"""ftcore vs Hugging Face transformers on tiny random models, in both checkpoint directions."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import ftcore.models as M
from tests.models.helpers import HF_CONFIGS, load_ftcore, make_hf_model

TOLERANCE = 1e-4


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_hf_checkpoint_loads_with_same_logits_and_saves_back(name, tmp_path):
    hf_model = make_hf_model(name)
    hf_model.save_pretrained(tmp_path / "hf")
    tokens = torch.randint(0, 128, (2, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(tokens).logits

    model = load_ftcore(tmp_path / "hf")
    with torch.no_grad():
        ours = model(tokens)
    assert (ours - expected).abs().max().item() <= TOLERANCE

    # ftcore's save (sharded on purpose) loads back into transformers with the same logits
    M.HFCheckpointer(str(tmp_path / "hf"), max_shard_size=40_000).save(model.state_dict(), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager"
    )
    with torch.no_grad():
        round_trip = reloaded.float().eval()(tokens).logits
    assert (round_trip - expected).abs().max().item() <= TOLERANCE


def test_packed_documents_match_separate_hf_runs(tmp_path):
    """input_pos restarting per document + a block-causal mask == each document run alone."""
    hf_model = make_hf_model("qwen2_5")
    hf_model.save_pretrained(tmp_path)
    model = load_ftcore(tmp_path)
    doc_a, doc_b = torch.randint(0, 128, (1, 7)), torch.randint(0, 128, (1, 9))
    packed = torch.cat([doc_a, doc_b], dim=1)
    input_pos = torch.cat([torch.arange(7), torch.arange(9)])[None]
    document = torch.tensor([0] * 7 + [1] * 9)
    causal = torch.tril(torch.ones(16, 16, dtype=torch.bool))
    mask = (causal & (document[:, None] == document[None, :]))[None]
    with torch.no_grad():
        ours = model(packed, input_pos=input_pos, mask=mask)
        expected = torch.cat([hf_model(doc_a).logits, hf_model(doc_b).logits], dim=1)
    assert (ours - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("name", ["llama3_1", "qwen2_5"])
def test_greedy_generation_matches_hf_generate_with_and_without_cache(name, tmp_path):
    hf_model = make_hf_model(name, seed=3)
    hf_model.save_pretrained(tmp_path)
    model = load_ftcore(tmp_path)
    prompt = [5, 17, 42, 9]
    with torch.no_grad():
        hf_out = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0
        )
    expected = hf_out[0, len(prompt) :].tolist()
    assert M.generate(model, [prompt], max_new_tokens=12) == [expected]
    assert M.generate(model, [prompt], max_new_tokens=12, use_cache=False) == [expected]


def test_left_padded_batch_decodes_like_single_prompts(tmp_path):
    make_hf_model("llama2", seed=4).save_pretrained(tmp_path)
    model = load_ftcore(tmp_path)
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8]]
    singles = [M.generate(model, [p], max_new_tokens=8)[0] for p in prompts]
    assert M.generate(model, prompts, max_new_tokens=8) == singles
