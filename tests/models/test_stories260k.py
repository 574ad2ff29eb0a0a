"""The real stories260K model (llama2.c, GGUF) against llama2.c's own greedy output."""

from __future__ import annotations

import importlib.util

import pytest
from omegaconf import OmegaConf

from ftcore.data.tokenizers.gguf import gguf_tokenizer
from ftcore.paths import CONFIGS_DIR, RECIPES_DIR

# From the assets README: the first 20 ids llama2.c generates greedily from BOS.
FIRST_20_IDS = [
    403,
    407,
    261,
    378,
    432,
    383,
    286,
    261,
    376,
    298,
    315,
    421,
    395,
    317,
    426,
    338,
    401,
    396,
    267,
    337,
]


def _generate_recipe_module():
    spec = importlib.util.spec_from_file_location("generate_recipe", RECIPES_DIR / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(assets, **overrides):
    cfg = OmegaConf.load(CONFIGS_DIR / "generate" / "stories260K.yaml")
    cfg.checkpoint_path = str(assets / "models" / "stories260K.gguf")
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def test_greedy_200_tokens_reproduce_llama2c_byte_for_byte(assets, capsys):
    expected = (assets / "models" / "stories260K_greedy200_expected.txt").read_text(encoding="utf-8")
    recipe = _generate_recipe_module().GenerateRecipe(_config(assets))
    recipe.setup()
    text = recipe.generate()
    assert text.encode("utf-8") == expected.encode("utf-8")
    assert expected in capsys.readouterr().out


def test_tokenizer_encodes_the_reference_text_to_llama2c_ids(assets):
    tokenizer = gguf_tokenizer(str(assets / "models" / "stories260K.gguf"))
    expected = (assets / "models" / "stories260K_greedy200_expected.txt").read_text(encoding="utf-8")
    ids = tokenizer.encode(expected, add_bos=True, add_eos=False)
    assert ids[:21] == [1, *FIRST_20_IDS]
    assert tokenizer.decode(ids) == expected


def test_tokenizer_takes_the_tokenizer_contract_generation_prompt_flag(assets):
    # No chat template in this vocabulary: the flag every tokenizer accepts has no header to add.
    tokenizer = gguf_tokenizer(str(assets / "models" / "stories260K.gguf"))
    messages = [{"role": "user", "content": "Once upon a time"}]
    plain = tokenizer.tokenize_messages(messages, add_eos=False)
    assert tokenizer.tokenize_messages(messages, add_eos=False, add_generation_prompt=True) == plain
    assert plain[0][0] == tokenizer.bos_id and tokenizer.decode(plain[0]) == "Once upon a time"


def test_tokenizer_byte_fallback_round_trips_unicode(assets):
    tokenizer = gguf_tokenizer(str(assets / "models" / "stories260K.gguf"))
    text = "Zoë saw 3 🐱 cats\tand  ünïcode"
    ids = tokenizer.encode(text, add_bos=False, add_eos=True)
    assert ids[-1] == tokenizer.eos_id == 2 and tokenizer.bos_id == 1
    assert tokenizer.pieces[ids[0]].startswith("\u2581")  # SentencePiece's dummy prefix space
    assert tokenizer.decode(ids) == text
    emoji_ids = tokenizer.encode("🐱", add_bos=False, add_eos=False)[1:]  # after the "▁" piece
    assert [tokenizer.pieces[i] for i in emoji_ids] == ["<0xF0>", "<0x9F>", "<0x90>", "<0xB1>"]


def test_sampling_is_seeded_and_stops(assets):
    module = _generate_recipe_module()
    texts = []
    for seed in (7, 7, 8):
        recipe = module.GenerateRecipe(_config(assets, seed=seed, temperature=1.0, top_k=20, top_p=0.9,
                                               max_new_tokens=20, prompt="Lily saw a"))  # fmt: skip
        recipe.setup()
        texts.append(recipe.generate())
    assert texts[0] == texts[1] != texts[2]
    assert all(t.startswith("Lily saw a") for t in texts)


def test_chat_messages_prompt(assets):
    cfg = _config(
        assets, prompt=None, messages=[{"role": "user", "content": "Tom had a dog."}], max_new_tokens=5
    )
    recipe = _generate_recipe_module().GenerateRecipe(cfg)
    recipe.setup()
    assert recipe.generate().startswith("Tom had a dog.")


def test_prompt_and_messages_together_are_rejected(assets):
    cfg = _config(assets, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="exactly one of `prompt`"):
        _generate_recipe_module().GenerateRecipe(cfg).setup()


@pytest.mark.parametrize(
    "setting, message",
    [({"top_k": 0}, "`top_k` must be >= 1"), ({"top_k": -1}, "`top_k` must be >= 1"),
     ({"top_p": 0.0}, r"`top_p` must be in \(0, 1\]"), ({"top_p": 1.5}, r"`top_p` must be in \(0, 1\]"),
     ({"temperature": -0.5}, "`temperature` must be >= 0")],
)  # fmt: skip
def test_sampling_settings_that_sample_nothing_are_refused_at_setup(assets, setting, message):
    # Before: torch's own errors from inside the sampler (a size mismatch, an invalid multinomial).
    cfg = _config(assets, **{"temperature": 0.8, **setting})
    with pytest.raises(ValueError, match=message):
        _generate_recipe_module().GenerateRecipe(cfg).setup()


@pytest.mark.parametrize(
    "setting, message",
    [({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
     ({"prompt": None, "messages": [{"role": "usr", "content": "hi"}]}, "role 'usr' is not supported"),
     ({"prompt": None, "messages": [{"role:user": None}]}, r"messages\[0\] has keys \['role:user'\]"),
     ({"prompt": None, "messages": ["hi"]}, r"messages\[0\] must be a mapping")],
)  # fmt: skip
def test_bad_generation_settings_are_refused_before_the_model_loads(assets, setting, message, monkeypatch):
    module = _generate_recipe_module()
    monkeypatch.setattr(module, "build_model", lambda *a: pytest.fail("the model was built first"))
    with pytest.raises(ValueError, match=message):
        module.GenerateRecipe(_config(assets, **setting)).setup()
