"""Hugging Face checkpoints: `config.json` + `model.safetensors` or sharded
`model-0000N-of-0000M.safetensors` with `model.safetensors.index.json`.

ftcore keeps the HF weight layout internally, so loading and saving are pure renames
(`hf_names.py`). `from_hf_config` builds the matching ftcore model from a `config.json`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ftcore.kernels.nf4_bnb import bnb_4bit_groups
from ftcore.models.builders import lora_transformer_decoder, transformer_decoder
from ftcore.models.checkpoint_common import TensorLoader, atomic_directory
from ftcore.models.hf_names import ftcore_to_hf, hf_to_ftcore
from ftcore.models.transformer import Llama3RopeScaling, TransformerDecoder, reset_buffers
from ftcore.paths import shown_path

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# small files worth carrying into a saved checkpoint so that it is self-contained for HF tools
_SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    # Meta's tokenizer file that Llama 3 repositories carry (Llama3Tokenizer reads it; the shipped
    # generate configs point at it), so an exported merged_model/ generates with the base's config
    "original/tokenizer.model",
)
_SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def parse_size(size: int | str) -> int:
    """`5GB`, `500MB`, `1024` -> bytes."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def read_hf_config(checkpoint_dir: str | Path) -> dict:
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise ValueError(
            f"{shown_path(path)} not found: a Hugging Face checkpoint folder needs its config.json"
        )
    return json.loads(path.read_text())


def hf_model_sizes(config: dict) -> dict:
    """The `transformer_decoder` arguments matching an HF Llama/Mistral/Qwen2 `config.json`."""
    model_type = config.get("model_type")
    if model_type not in _SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"config.json model_type {model_type!r} is not supported; use one of {_SUPPORTED_MODEL_TYPES}"
        )
    # transformers >= 5 writes `rope_parameters` (holding rope_theta); older versions `rope_scaling`
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"config.json rope type {rope_type!r} is not supported (only default and llama3)")
    scaling = None
    if rope_type == "llama3":
        scaling = Llama3RopeScaling(
            factor=rope["factor"],
            low_freq_factor=rope["low_freq_factor"],
            high_freq_factor=rope["high_freq_factor"],
            original_max_seq_len=rope["original_max_position_embeddings"],
        )
    n_heads = config["num_attention_heads"]
    return dict(
        vocab_size=config["vocab_size"],
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        hidden_dim=config["intermediate_size"],
        max_seq_len=config.get("max_position_embeddings", 4096),
        rope_base=float(rope.get("rope_theta", config.get("rope_theta", 10_000.0))),
        norm_eps=config.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
        head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
        rope_scaling=scaling,
    )


def from_hf_config(checkpoint_dir: str, quantize_base: bool = False) -> TransformerDecoder:
    """Build the ftcore model described by `<checkpoint_dir>/config.json` (weights not loaded)."""
    return transformer_decoder(quantize_base=quantize_base, **hf_model_sizes(read_hf_config(checkpoint_dir)))


def lora_from_hf_config(
    checkpoint_dir: str,
    lora_attn_modules: Sequence[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    quantize_base: bool = False,
    use_dora: bool = False,
) -> TransformerDecoder:
    """`from_hf_config` with LoRA adapters; the LoRA arguments as for `lora_transformer_decoder`."""
    sizes = hf_model_sizes(read_hf_config(checkpoint_dir))
    return lora_transformer_decoder(
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        lora_rank,
        lora_alpha,
        lora_dropout,
        quantize_base,
        use_dora,
        **sizes,
    )


class HFCheckpointer:
    """Load HF safetensors into an ftcore model and save ftcore state dicts back in HF layout."""

    def __init__(self, checkpoint_dir: str, output_dir: str | None = None, max_shard_size: int | str = "5GB"):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.max_shard_size = parse_size(max_shard_size)

    def weight_files(self) -> list[Path]:
        index = self.checkpoint_dir / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [self.checkpoint_dir / name for name in sorted(set(weight_map.values()))]
            if missing := [f.name for f in files if not f.is_file()]:
                raise ValueError(
                    f"{index} lists {len(files)} weight file(s), of which {missing[:4]} are not in "
                    f"{self.checkpoint_dir}; the download is incomplete: fetch the missing shard(s) again"
                )
            return files
        single = self.checkpoint_dir / SINGLE_FILE
        if single.is_file():
            return [single]
        raise ValueError(
            f"no {SINGLE_FILE} or {INDEX_FILE} in {self.checkpoint_dir}; point checkpoint_dir at a "
            "Hugging Face model folder saved in safetensors format"
        )

    def load_into(self, model: TransformerDecoder) -> None:
        """Stream every tensor into the materialized `model` (dtype converted on copy)."""
        loader = TensorLoader(model, source=str(self.checkpoint_dir))
        for path in self.weight_files():
            with safe_open(path, framework="pt") as file:
                names = list(file.keys())
                quantized = bnb_4bit_groups(names)  # packed weight -> its keys (bnb-4bit checkpoints)
                companions = {k for group in quantized.values() for k in group}
                for hf_key in names:
                    if hf_key.endswith("rotary_emb.inv_freq"):
                        continue  # old transformers saved RoPE buffers; ftcore recomputes them
                    key = hf_to_ftcore(hf_key)
                    if key == "output.weight" and model.tied_embeddings:
                        continue  # some tied checkpoints also store lm_head; the embedding is used
                    source_key = f"{path.name}:{hf_key}"
                    with torch.no_grad():
                        if hf_key in quantized:
                            entries = {key + k[len(hf_key) :]: file.get_tensor(k) for k in quantized[hf_key]}
                            loader.load_bnb_4bit(key, entries, source_key)
                        elif hf_key not in companions:
                            loader.load(key, file.get_tensor(hf_key), source_key=source_key)
        loader.finish()
        reset_buffers(model)

    def save(self, state_dict: dict[str, torch.Tensor], output_dir: str | None = None) -> Path:
        """Write `state_dict` (ftcore names) as HF safetensors shards + index + config.json."""
        target = Path(output_dir) if output_dir is not None else self.output_dir
        if target is None:
            raise ValueError("HFCheckpointer.save needs an output_dir (argument or constructor)")
        return write_hf_checkpoint(
            state_dict, target, read_hf_config(self.checkpoint_dir), self.max_shard_size, self.checkpoint_dir
        )


def write_hf_checkpoint(
    state_dict: dict[str, torch.Tensor],
    target: Path,
    config: dict,
    max_shard_size: int = 5 * 10**9,
    side_files_from: Path | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Atomically write an HF checkpoint folder: shards (+ index when several), config.json, the
    tokenizer files of `side_files_from` and `extra_files` ({name: content})."""
    shards = _plan_shards(state_dict, max_shard_size)
    with atomic_directory(target) as tmp:
        weight_map, total_size = {}, 0
        for number, shard in enumerate(shards, start=1):
            name = SINGLE_FILE if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            tensors = {ftcore_to_hf(key): tensor.detach().contiguous().cpu() for key, tensor in shard.items()}
            save_file(tensors, tmp / name, metadata={"format": "pt"})
            for hf_key, tensor in tensors.items():
                weight_map[hf_key] = name
                total_size += tensor.numel() * tensor.element_size()
        if len(shards) > 1:
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        config = dict(config)
        dtype = next(iter(state_dict.values())).dtype
        if dtype in _DTYPE_NAMES:
            config["torch_dtype"] = _DTYPE_NAMES[dtype]
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for side_file in _SIDE_FILES if side_files_from is not None else ():
            source = cast(Path, side_files_from)  # the loop runs only when it is set
            if (source / side_file).is_file():
                (tmp / side_file).parent.mkdir(exist_ok=True)
                shutil.copy2(source / side_file, tmp / side_file)
        for name, content in (extra_files or {}).items():
            (tmp / name).write_bytes(content)
    return target


def _plan_shards(state_dict: dict[str, torch.Tensor], max_shard_size: int) -> list[dict[str, torch.Tensor]]:
    """Group tensors in order into shards of at most `max_shard_size` bytes (a bigger tensor alone)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for key, tensor in state_dict.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_size:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = tensor
        shard_bytes += size
    return shards


def hf_config_from_sizes(sizes: dict) -> dict:
    """An HF `config.json` for a model built with these `transformer_decoder` arguments
    (Qwen2 when q/k/v carry biases, else Llama), for checkpoints that did not come with one."""
    is_qwen2 = bool(sizes.get("qkv_bias", False))
    n_heads = sizes["n_heads"]
    config = {
        "architectures": ["Qwen2ForCausalLM" if is_qwen2 else "LlamaForCausalLM"],
        "model_type": "qwen2" if is_qwen2 else "llama",
        "vocab_size": sizes["vocab_size"],
        "hidden_size": sizes["dim"],
        "num_hidden_layers": sizes["n_layers"],
        "num_attention_heads": n_heads,
        "num_key_value_heads": sizes["n_kv_heads"],
        "head_dim": sizes.get("head_dim") or sizes["dim"] // n_heads,
        "intermediate_size": sizes["hidden_dim"],
        "max_position_embeddings": sizes["max_seq_len"],
        "rms_norm_eps": sizes.get("norm_eps", 1e-5),
        "rope_theta": sizes.get("rope_base", 10_000.0),
        "tie_word_embeddings": bool(sizes.get("tie_embeddings", False)),
        "hidden_act": "silu",
    }
    scaling = sizes.get("rope_scaling")
    if scaling is not None:
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_seq_len,
        }
    if not is_qwen2:
        config["attention_bias"] = False
    return config
