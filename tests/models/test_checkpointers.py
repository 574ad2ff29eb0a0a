"""Meta and HF checkpointers: layout conversion against HF weights, and clear load errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import ftcore.models as M
from ftcore.models.checkpoint_hf import hf_model_sizes, read_hf_config
from ftcore.models.hf_names import ftcore_to_hf
from tests.models.helpers import load_ftcore, make_hf_model


def _to_meta_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Written out by definition, row by row: in HF's layout dims i and i + d/2 of a head rotate
    together; Meta stores that pair at rows 2i and 2i + 1."""
    head_dim = weight.shape[0] // n_heads
    out = torch.empty_like(weight)
    for head in range(n_heads):
        base = head * head_dim
        for i in range(head_dim // 2):
            out[base + 2 * i] = weight[base + i]
            out[base + 2 * i + 1] = weight[base + head_dim // 2 + i]
    return out


def _hf_to_meta_state(hf_state: dict, n_heads: int, n_kv_heads: int) -> dict:
    meta = {
        "tok_embeddings.weight": hf_state["model.embed_tokens.weight"],
        "norm.weight": hf_state["model.norm.weight"],
        "output.weight": hf_state["lm_head.weight"],
    }
    names = {"self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1",
             "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
             "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}  # fmt: skip
    for layer in range(2):
        hf = f"model.layers.{layer}."
        meta[f"layers.{layer}.attention.wq.weight"] = _to_meta_interleaved(
            hf_state[hf + "self_attn.q_proj.weight"], n_heads
        )
        meta[f"layers.{layer}.attention.wk.weight"] = _to_meta_interleaved(
            hf_state[hf + "self_attn.k_proj.weight"], n_kv_heads
        )
        for hf_name, meta_name in names.items():
            meta[f"layers.{layer}.{meta_name}.weight"] = hf_state[f"{hf}{hf_name}.weight"]
    return meta


def _meta_checkpoint(tmp_path, params_json: str):
    """An HF model and the same weights as a Meta checkpoint in tmp_path/meta: (hf model, meta state, sizes)."""
    hf_model = make_hf_model("llama3_1")
    hf_model.save_pretrained(tmp_path / "hf")
    meta_state = _hf_to_meta_state(hf_model.state_dict(), n_heads=4, n_kv_heads=2)
    (tmp_path / "meta").mkdir()
    torch.save(meta_state, tmp_path / "meta" / "consolidated.00.pth")
    (tmp_path / "meta" / "params.json").write_text(params_json)
    return hf_model, meta_state, hf_model_sizes(read_hf_config(tmp_path / "hf"))


def test_meta_checkpoint_loads_with_hf_logits_and_saves_identically(tmp_path):
    hf_model, meta_state, sizes = _meta_checkpoint(tmp_path, "{}")
    with torch.device("meta"):
        model = M.transformer_decoder(**sizes)
    model.to_empty(device="cpu")
    M.MetaCheckpointer(str(tmp_path / "meta")).load_into(model)
    tokens = torch.randint(0, 128, (1, 70))
    with torch.no_grad():
        assert (model(tokens) - hf_model(tokens).logits).abs().max().item() <= 1e-4

    M.MetaCheckpointer(str(tmp_path / "meta")).save(
        model.state_dict(), tmp_path / "saved", n_heads=4, n_kv_heads=2
    )
    saved = torch.load(tmp_path / "saved" / "consolidated.00.pth", weights_only=True)
    assert saved.keys() == meta_state.keys()
    assert all(torch.equal(saved[k], meta_state[k]) for k in meta_state)
    assert (tmp_path / "saved" / "params.json").is_file()


def test_a_recipe_saves_and_resumes_through_a_meta_checkpointer_without_head_counts(tmp_path):
    # The recipes call checkpointer.save(state_dict, folder): the head counts come from params.json.
    from ftcore.runner.weights import load_model_weights, save_model_weights

    _, meta_state, sizes = _meta_checkpoint(tmp_path, '{"n_heads": 4, "n_kv_heads": 2}')
    model = M.transformer_decoder(**sizes)
    M.MetaCheckpointer(str(tmp_path / "meta")).load_into(model)

    save_model_weights(M.MetaCheckpointer(str(tmp_path / "meta")), model.state_dict(), tmp_path / "step")
    saved = torch.load(tmp_path / "step" / "consolidated.00.pth", weights_only=True)
    assert all(torch.equal(saved[k], meta_state[k]) for k in meta_state)
    resumed = M.transformer_decoder(**sizes)
    load_model_weights(resumed, tmp_path / "step")
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in model.state_dict().items())


def test_meta_save_without_head_counts_anywhere_names_params_json(tmp_path):
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "params.json").write_text("{}")
    model = M.transformer_decoder(**hf_model_sizes(make_hf_model("llama3_1").config.to_dict()))
    with pytest.raises(ValueError, match=r"params\.json has no n_heads; pass n_heads="):
        M.MetaCheckpointer(str(tmp_path / "meta")).save(model.state_dict(), tmp_path / "out")


@pytest.fixture
def hf_dir(tmp_path):
    make_hf_model("llama2").save_pretrained(tmp_path)
    return tmp_path


def _edit_checkpoint(folder, edit):
    path = folder / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(hf_dir):
    _edit_checkpoint(hf_dir, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing 1 tensor.*layers\.1\.mlp\.w3\.weight"):
        load_ftcore(hf_dir)


def test_unexpected_tensor_is_named(hf_dir):
    _edit_checkpoint(hf_dir, lambda s: s.update({"model.layers.5.mlp.up_proj.weight": torch.zeros(128, 64)}))
    with pytest.raises(ValueError, match=r"unexpected tensor.*model\.layers\.5\.mlp\.up_proj\.weight"):
        load_ftcore(hf_dir)


def test_misshapen_tensor_is_named(hf_dir):
    _edit_checkpoint(hf_dir, lambda s: s.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(ValueError, match=r"shape mismatch.*model\.norm\.weight.*\(65,\).*\(64,\)"):
        load_ftcore(hf_dir)


def test_lora_and_qlora_models_load_base_weights(hf_dir):
    """Base weights stream into LoRALinear layers under their plain `weight` keys: float bases give
    the base model's logits (fresh adapters have B = 0); NF4 bases hold the quantized checkpoint."""
    reference = load_ftcore(hf_dir)
    sizes = hf_model_sizes(read_hf_config(hf_dir))
    hf_state = load_file(hf_dir / "model.safetensors")
    tokens = torch.randint(0, 128, (1, 12))
    for quantize_base in (False, True):
        with torch.device("meta"):
            model = M.lora_transformer_decoder(
                ["q_proj", "v_proj"], apply_lora_to_mlp=True, quantize_base=quantize_base, **sizes
            )
        model.to_empty(device="cpu")
        M.init_weights(model)
        M.HFCheckpointer(str(hf_dir)).load_into(model)
        if not quantize_base:
            with torch.no_grad():
                assert (model(tokens) - reference(tokens)).abs().max().item() <= 1e-5
            continue
        # NF4 keeps ~7% relative error on normal weights (QLoRA paper); garbage or zeros would not
        for name in ("layers.0.attn.q_proj", "layers.1.mlp.w2", "layers.1.attn.k_proj"):
            loaded = model.get_submodule(name)
            dequantized = (
                loaded.base_weight() if hasattr(loaded, "base_weight") else loaded.weight_nf4.dequantize()
            )
            original = hf_state[ftcore_to_hf(name + ".weight")]
            relative_error = (dequantized.float() - original).norm() / original.norm()
            assert relative_error < 0.15, (name, relative_error)


def test_saved_hf_folder_carries_the_bases_tokenizer_files(tmp_path, assets):
    """A merged_model/ export generates with its base's config: Llama 3 repositories keep Meta's tokenizer
    in original/tokenizer.model (where the shipped generate configs read it) beside tokenizer.json."""
    from ftcore.data.tokenizers import Llama3Tokenizer

    hf_model = make_hf_model("llama3_1")
    hf_model.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "original").mkdir()
    real = (assets / "tokenizers" / "llama3_tokenizer.model").read_bytes()
    (tmp_path / "base" / "original" / "tokenizer.model").write_bytes(real)
    (tmp_path / "base" / "tokenizer.json").write_text("{}")
    checkpointer = M.HFCheckpointer(str(tmp_path / "base"))
    model = load_ftcore(tmp_path / "base")
    checkpointer.save(model.state_dict(), str(tmp_path / "merged"))
    assert (tmp_path / "merged" / "original" / "tokenizer.model").read_bytes() == real
    assert (tmp_path / "merged" / "tokenizer.json").read_text() == "{}"
    assert Llama3Tokenizer(str(tmp_path / "merged" / "original" / "tokenizer.model")).encode(
        "Hello world", add_bos=False, add_eos=False
    ) == [9906, 1917]  # the ids Meta's tokenizer gives (assets README)


def _lora_model(sizes: dict, quantize_base: bool) -> M.TransformerDecoder:
    with torch.device("meta"):
        model = M.lora_transformer_decoder(
            ["q_proj", "v_proj"], apply_lora_to_mlp=True, quantize_base=quantize_base, **sizes
        )
    model.to_empty(device="cpu")
    M.init_weights(model)
    return model


def test_a_bnb_4bit_checkpoint_streams_its_bytes_into_qlora(hf_dir, tmp_path):
    # A pre-quantized HF checkpoint in bitsandbytes' layout (each projection: the packed bytes with its
    # absmax, quant_map, nested_* and quant_state entries, as the docs describe it), written from the
    # NF4 parts the float checkpoint quantizes to: loading it must put exactly those bytes back.
    from ftcore.kernels.nf4_bnb import to_bnb_4bit_state
    from ftcore.modules.nf4 import NF4Linear, nf4_state_dict_mode

    sizes = hf_model_sizes(read_hf_config(hf_dir))
    from_float = _lora_model(sizes, quantize_base=True)
    M.HFCheckpointer(str(hf_dir)).load_into(from_float)
    state = load_file(hf_dir / "model.safetensors")
    for name, module in from_float.named_modules():
        if isinstance(module, NF4Linear):
            hf_key = ftcore_to_hf(name.removesuffix(".nf4_base") + ".weight")
            state.update(to_bnb_4bit_state(hf_key, module.weight_nf4))
    bnb_dir = tmp_path / "bnb"
    bnb_dir.mkdir()
    (bnb_dir / "config.json").write_text((hf_dir / "config.json").read_text())
    save_file(state, bnb_dir / "model.safetensors", metadata={"format": "pt"})

    from_bnb = _lora_model(sizes, quantize_base=True)
    M.HFCheckpointer(str(bnb_dir)).load_into(from_bnb)
    with nf4_state_dict_mode("nf4"):
        expected, loaded = from_float.state_dict(), from_bnb.state_dict()
    nf4_keys = [k for k in expected if "weight_packed" in k]
    assert len(nf4_keys) == 7 * sizes["n_layers"]  # every projection of every block
    for key, tensor in expected.items():
        if "lora_" not in key:  # adapters are drawn fresh by each build
            assert torch.equal(loaded[key], tensor), key

    with pytest.raises(ValueError, match="pre-quantized by bitsandbytes.*set model.quantize_base=true"):
        M.HFCheckpointer(str(bnb_dir)).load_into(_lora_model(sizes, quantize_base=False))


def test_a_missing_shard_names_the_index_and_the_file(tmp_path):
    make_hf_model("llama2").save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(
        ValueError, match=rf"model\.safetensors\.index\.json lists .*'{shards[-1].name}'.*incomplete"
    ):
        load_ftcore(tmp_path)
