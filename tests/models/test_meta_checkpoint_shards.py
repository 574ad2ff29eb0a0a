"""Meta model-parallel checkpoints (`consolidated.NN.pth` shards): load against HF transformers'
logits, save back to the same shards, and clear errors for shard sets that do not fit together.

The reference shards are built here by hand from a random HF Llama, from the documented facts:
q/k rows interleaved per head (HF rotates dims i and i + d/2 together, Meta rows 2i and 2i + 1), and
Meta's parallel layers: ColumnParallelLinear (wq wk wv w1 w3 output) split dim 0, RowParallelLinear
(wo w2) dim 1, embeddings dim 1 (Llama 2 ParallelEmbedding) or dim 0 (Llama 3
VocabParallelEmbedding), norms and rope.freqs replicated.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import ftcore.models as M

N_HEADS, DIM, HIDDEN, VOCAB, LAYERS = 8, 64, 128, 128, 2
HEAD_DIM = DIM // N_HEADS
_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def make_hf_llama(n_kv_heads: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=N_HEADS, num_key_value_heads=n_kv_heads, rms_norm_eps=1e-5,
        rope_theta=10_000.0, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # random norm weights, so that a norm lost or mixed up shows in the logits
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.1)
    return model


def interleave_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows -> Meta's interleaved rows, head by head, row by row."""
    out = torch.empty_like(weight)
    for base in range(0, n_heads * HEAD_DIM, HEAD_DIM):
        for i in range(HEAD_DIM // 2):
            out[base + 2 * i] = weight[base + i]
            out[base + 2 * i + 1] = weight[base + HEAD_DIM // 2 + i]
    return out


def meta_state_from_hf(hf: transformers.LlamaForCausalLM, n_kv_heads: int) -> dict[str, torch.Tensor]:
    sd = hf.state_dict()
    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"]}  # fmt: skip
    for layer in range(LAYERS):
        hf_layer, meta_layer = f"model.layers.{layer}.", f"layers.{layer}."
        meta[meta_layer + "attention.wq.weight"] = interleave_rows(
            sd[hf_layer + "self_attn.q_proj.weight"], N_HEADS
        )
        meta[meta_layer + "attention.wk.weight"] = interleave_rows(
            sd[hf_layer + "self_attn.k_proj.weight"], n_kv_heads
        )
        for hf_name, meta_name in (("self_attn.v_proj", "attention.wv"), ("self_attn.o_proj", "attention.wo"),
                                   ("mlp.gate_proj", "feed_forward.w1"), ("mlp.down_proj", "feed_forward.w2"),
                                   ("mlp.up_proj", "feed_forward.w3"), ("input_layernorm", "attention_norm"),
                                   ("post_attention_layernorm", "ffn_norm")):  # fmt: skip
            meta[f"{meta_layer}{meta_name}.weight"] = sd[f"{hf_layer}{hf_name}.weight"]
    return meta


def split_like_meta(meta: dict, num_shards: int, embedding_dim: int, rope_freqs: bool) -> list[dict]:
    shards = [{} for _ in range(num_shards)]
    for key, tensor in meta.items():
        module = key.split(".")[-2]
        dim = embedding_dim if module == "tok_embeddings" else _SPLIT.get(module)
        for index, shard in enumerate(shards):
            shard[key] = tensor.clone() if dim is None else tensor.chunk(num_shards, dim)[index].clone()
    if rope_freqs:  # Llama 2 shards carry a replicated RoPE table (head_dim / 2,) that loaders ignore
        for shard in shards:
            shard["rope.freqs"] = torch.ones(HEAD_DIM // 2)
    return shards


def write_shards(folder, shards: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{index:02d}.pth")


def ftcore_model(n_kv_heads: int) -> M.TransformerDecoder:
    with torch.device("meta"):
        model = M.tiny_llama(VOCAB, DIM, LAYERS, N_HEADS, n_kv_heads, HIDDEN, tie_embeddings=False)
    model.to_empty(device="cpu")
    return model.eval()


# (n_kv_heads, num_shards, embedding split dim): Llama 2 style, Llama 3 70B style (one KV head per
# shard), and two KV heads over two shards.
CASES = [(4, 2, 1), (4, 4, 0), (2, 2, 0)]


@pytest.mark.parametrize("n_kv_heads,num_shards,embedding_dim", CASES)
def test_sharded_meta_checkpoint_gives_hf_logits_and_saves_the_same_shards(
    tmp_path, n_kv_heads, num_shards, embedding_dim
):
    hf = make_hf_llama(n_kv_heads)
    shards = split_like_meta(meta_state_from_hf(hf, n_kv_heads), num_shards, embedding_dim, rope_freqs=True)
    assert shards[0]["layers.0.attention.wk.weight"].shape == (n_kv_heads // num_shards * HEAD_DIM, DIM)
    write_shards(tmp_path / "meta", shards)

    model = ftcore_model(n_kv_heads)
    M.MetaCheckpointer(str(tmp_path / "meta")).load_into(model)
    tokens = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-4, diff

    # embedding_split_dim left out: taken from the source shards
    saved = M.MetaCheckpointer(str(tmp_path / "meta")).save(
        model.state_dict(), tmp_path / "saved", n_heads=N_HEADS, n_kv_heads=n_kv_heads, num_shards=num_shards
    )
    for index, expected in enumerate(shards):
        written = torch.load(saved / f"consolidated.{index:02d}.pth", weights_only=True)
        expected = {key: value for key, value in expected.items() if key != "rope.freqs"}
        assert written.keys() == expected.keys()
        assert all(torch.equal(written[key], expected[key]) for key in expected)

    reloaded = ftcore_model(n_kv_heads)
    M.MetaCheckpointer(str(saved)).load_into(reloaded)
    original = model.state_dict()
    assert all(torch.equal(value, original[key]) for key, value in reloaded.state_dict().items())


def test_each_saved_shard_holds_only_its_slice_and_params_json_gives_back_the_sizes(tmp_path):
    hf = make_hf_llama(4)
    write_shards(tmp_path / "meta", [meta_state_from_hf(hf, 4)])
    model = ftcore_model(4)
    M.MetaCheckpointer(str(tmp_path / "meta")).load_into(model)
    full_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    saved = M.MetaCheckpointer(str(tmp_path / "meta")).save(
        model.state_dict(), tmp_path / "out", n_heads=N_HEADS, n_kv_heads=4, num_shards=4,
        embedding_split_dim=0, params={"norm_eps": 1e-5},
    )  # fmt: skip
    # a slice saved as a view would drag its whole tensor into the file
    assert all((saved / f"consolidated.0{i}.pth").stat().st_size < 0.3 * full_bytes for i in range(4))

    params = json.loads((saved / "params.json").read_text())
    assert (params["dim"], params["n_layers"], params["n_heads"], params["n_kv_heads"]) == (DIM, LAYERS, 8, 4)
    assert (params["vocab_size"], params["norm_eps"]) == (VOCAB, 1e-5)
    # Meta's FeedForward width: multiple_of * ceil(int(ffn_dim_multiplier * int(8 * dim / 3)) / multiple_of)
    width = int(params.get("ffn_dim_multiplier", 1.0) * int(2 * 4 * params["dim"] / 3))
    multiple_of = params["multiple_of"]
    assert multiple_of * ((width + multiple_of - 1) // multiple_of) == HIDDEN


@pytest.fixture
def two_shards(tmp_path):
    """A valid 2-shard Llama 3 style checkpoint of a model with 4 KV heads."""
    shards = split_like_meta(meta_state_from_hf(make_hf_llama(4), 4), 2, embedding_dim=0, rope_freqs=False)
    return tmp_path / "meta", shards


def load_error(folder, shards) -> str:
    write_shards(folder, shards)
    with pytest.raises(ValueError) as error:
        M.MetaCheckpointer(str(folder)).load_into(ftcore_model(4))
    return str(error.value)


def test_a_missing_shard_file_is_named(two_shards):
    folder, shards = two_shards
    write_shards(folder, shards + shards)
    (folder / "consolidated.02.pth").unlink()
    with pytest.raises(
        ValueError, match=r"consolidated\.00\.pth, consolidated\.01\.pth, consolidated\.03\.pth"
    ):
        M.MetaCheckpointer(str(folder)).load_into(ftcore_model(4))


def test_shards_of_a_different_split_count_name_file_and_tensor(tmp_path):
    # two of the four shards of a 4-way split: every split tensor comes out half as large
    shards = split_like_meta(meta_state_from_hf(make_hf_llama(4), 4), 4, embedding_dim=0, rope_freqs=False)
    message = load_error(tmp_path / "meta", shards[:2])
    assert "tok_embeddings.weight" in message and "consolidated.00.pth" in message and "1/2" in message


def test_a_shard_with_a_different_shape_names_file_and_tensor(two_shards):
    folder, shards = two_shards
    shards[1]["layers.1.attention.wq.weight"] = shards[1]["layers.1.attention.wq.weight"][:8]
    message = load_error(folder, shards)
    assert "'layers.1.attention.wq.weight'" in message and "consolidated.01.pth" in message


def test_a_tensor_missing_from_one_shard_is_named(two_shards):
    folder, shards = two_shards
    del shards[1]["layers.0.feed_forward.w2.weight"]
    message = load_error(folder, shards)
    assert "'layers.0.feed_forward.w2.weight'" in message and "consolidated.00.pth" in message


def test_replicated_tensors_that_differ_are_named(two_shards):
    folder, shards = two_shards
    shards[1]["layers.0.ffn_norm.weight"] = shards[1]["layers.0.ffn_norm.weight"] + 1
    message = load_error(folder, shards)
    assert "'layers.0.ffn_norm.weight'" in message and "consolidated.01.pth" in message


def test_concatenated_shape_that_does_not_fit_the_model_is_named(two_shards):
    folder, shards = two_shards
    for shard in shards:  # both shards agree with each other, but the merged w1 has 2 rows too many
        shard["layers.0.feed_forward.w1.weight"] = torch.zeros(HIDDEN // 2 + 1, DIM)
    message = load_error(folder, shards)
    assert "'layers.0.feed_forward.w1.weight'" in message and "(130, 64)" in message


def test_save_rejects_shard_counts_meta_cannot_run(tmp_path):
    model = ftcore_model(4)
    checkpointer = M.MetaCheckpointer(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="num_shards=3 must"):
        checkpointer.save(model.state_dict(), tmp_path / "a", n_heads=8, n_kv_heads=4, num_shards=3)
    with pytest.raises(ValueError, match="embedding_split_dim"):
        checkpointer.save(model.state_dict(), tmp_path / "b", n_heads=8, n_kv_heads=4, num_shards=2)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
