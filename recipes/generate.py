"""Generate text from a model: a prompt string or chat messages in, text printed out.

ftcore run generate --config generate/stories260K
ftcore run generate --config generate/stories260K prompt="Once upon a time" temperature=0.8 top_k=40
"""

from __future__ import annotations

import time

from omegaconf import DictConfig, OmegaConf

from ftcore.config import instantiate
from ftcore.config.errors import run_setup
from ftcore.data.messages import Message
from ftcore.models.generation import check_max_new_tokens, check_sampling, generate
from ftcore.runner.setup import build_model, resolve_device, resolve_dtype, seed_everything

CONFIG_KEYS: dict[str, type | tuple[type, ...]] = {
    "model": dict,
    "tokenizer": dict,
    "checkpointer": dict,
    "checkpoint_path": (str, type(None)),
    "checkpoint_dir": (str, type(None)),
    "device": str,
    "dtype": str,
    "seed": int,
    "prompt": (str, type(None)),
    "messages": (list, type(None)),
    "max_new_tokens": int,
    "temperature": (float, int),
    "top_k": (int, type(None)),
    "top_p": (float, type(None)),
}


def _message(index: int, fields) -> Message:
    """messages[index] of the config as a Message; a wrong shape or key is named, with the keys it takes."""
    if not isinstance(fields, dict):
        raise ValueError(
            f"messages[{index}] must be a mapping such as {{role: user, content: hi}}, got {fields!r}"
        )
    try:
        return Message(**fields)
    except TypeError:
        raise ValueError(
            f"messages[{index}] has keys {sorted(fields)}; a message takes role and content (and optionally "
            "masked), e.g. {role: user, content: hi}. In YAML flow style put a space after each colon"
        ) from None


class GenerateRecipe:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.seed = cfg.get("seed", 0)

    def setup(self) -> None:
        cfg = self.cfg
        self.device = resolve_device(cfg.get("device", "cpu"))
        self.dtype = resolve_dtype(cfg.get("dtype", "fp32"), self.device)
        if (cfg.get("prompt") is None) == (cfg.get("messages") is None):
            raise ValueError(
                'set exactly one of `prompt` (a string; "" starts from BOS) or `messages` (a chat)'
            )
        check_sampling(float(cfg.get("temperature", 0.0)), cfg.get("top_k"), cfg.get("top_p"))
        check_max_new_tokens(cfg.get("max_new_tokens", 200))
        seed_everything(self.seed)
        self.tokenizer = instantiate(self.cfg.tokenizer)
        self.prompt = self.prompt_tokens()  # before the model loads: a bad message fails in a moment
        checkpointer = instantiate(self.cfg.checkpointer)
        self.model = build_model(self.cfg.model, self.device, self.dtype, checkpointer).eval()
        vocab = self.model.tok_embeddings.num_embeddings
        if self.tokenizer.vocab_size > vocab:
            raise ValueError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model only {vocab}"
            )

    def prompt_tokens(self) -> list[int]:
        if self.cfg.get("messages") is not None:
            messages = [
                _message(i, m) for i, m in enumerate(OmegaConf.to_container(self.cfg.messages, resolve=True))
            ]
            # A last assistant message is an answer to continue; otherwise the model answers the last turn.
            answering = messages[-1].role != "assistant"
            tokens, _ = self.tokenizer.tokenize_messages(
                messages, add_eos=False, add_generation_prompt=answering
            )
            return tokens
        return self.tokenizer.encode(self.cfg.prompt, add_bos=True, add_eos=False)

    def generate(self) -> str:
        """Return (and print) the prompt followed by the generated text."""
        prompt = self.prompt
        started = time.perf_counter()
        new_tokens = generate(
            self.model,
            [prompt],
            max_new_tokens=self.cfg.get("max_new_tokens", 200),
            temperature=float(self.cfg.get("temperature", 0.0)),
            top_k=self.cfg.get("top_k"),
            top_p=self.cfg.get("top_p"),
            stop_tokens=self.tokenizer.stop_tokens,
            pad_id=self.tokenizer.pad_id,
            seed=self.seed,
        )[0]
        seconds = time.perf_counter() - started
        text = self.tokenizer.decode(prompt + new_tokens)
        print(text)
        print(
            f"\n[{len(new_tokens)} tokens in {seconds:.2f} s, {len(new_tokens) / max(seconds, 1e-9):.1f} tokens/s]"
        )
        return text

    def cleanup(self) -> None:
        self.model = None


def recipe_main(cfg: DictConfig) -> None:
    recipe = GenerateRecipe(cfg)
    run_setup(recipe.setup)
    recipe.generate()
    recipe.cleanup()
