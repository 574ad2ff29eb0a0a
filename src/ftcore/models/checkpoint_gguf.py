"""GGUF files (llama.cpp's format) holding float weights, e.g. llama2.c's `stories260K.gguf`.

GGUF stores q/k projections in Meta's interleaved RoPE layout, so they are permuted into ftcore's
rotate-half layout on load. Quantized GGUF tensor types are rejected with a clear error.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ftcore.data.tokenizers.gguf import gguf_tokenizer, open_gguf
from ftcore.data.tokenizers.sentencepiece_model import sentencepiece_model_bytes, tokenizer_config_json
from ftcore.models.builders import lora_transformer_decoder, transformer_decoder
from ftcore.models.checkpoint_common import TensorLoader, interleaved_to_halves
from ftcore.models.checkpoint_hf import hf_config_from_sizes, write_hf_checkpoint
from ftcore.models.transformer import TransformerDecoder, reset_buffers

_TOP_LEVEL = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
_IN_BLOCK = {
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.output_proj",
    "attn_norm": "attn_norm",
    "ffn_gate": "mlp.w1",
    "ffn_down": "mlp.w2",
    "ffn_up": "mlp.w3",
    "ffn_norm": "mlp_norm",
}
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_FLOAT_TYPES = ("F32", "F16", "BF16")


def _reader(path: str | Path):
    return open_gguf(path, "the checkpoint or model path")


def gguf_to_ftcore(name: str) -> str:
    """`blk.0.attn_q.weight` -> `layers.0.attn.q_proj.weight`; `token_embd.weight` -> `tok_embeddings.weight`."""
    if match := _BLOCK_NAME.match(name):
        layer, module, leaf = match.groups()
        if module in _IN_BLOCK:
            return f"layers.{layer}.{_IN_BLOCK[module]}.{leaf}"
    module, _, leaf = name.rpartition(".")
    if module in _TOP_LEVEL:
        return f"{_TOP_LEVEL[module]}.{leaf}"
    raise ValueError(f"unexpected GGUF tensor {name!r}: ftcore reads Llama-architecture GGUF files")


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _tensor_to_torch(tensor) -> torch.Tensor:
    if tensor.tensor_type.name not in _FLOAT_TYPES:
        raise ValueError(
            f"GGUF tensor {tensor.name!r} is quantized ({tensor.tensor_type.name}); ftcore loads only "
            f"float GGUF weights ({', '.join(_FLOAT_TYPES)}): convert the model with an f32/f16 outtype"
        )
    data = np.array(tensor.data)  # copy out of the memory map; numpy shape is (out, in) already
    if tensor.tensor_type.name == "BF16":
        return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(data)


def gguf_model_sizes(path: str | Path) -> dict:
    """The `transformer_decoder` arguments described by a GGUF file's metadata."""
    reader = _reader(path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture is {arch!r}; ftcore reads only 'llama' GGUF files")
    tensors = {t.name: t for t in reader.tensors}
    n_heads = int(_field(reader, "llama.attention.head_count"))
    dim = int(_field(reader, "llama.embedding_length"))
    # The output projection is tied when it is absent or an exact copy of the embedding.
    tied = "output.weight" not in tensors or np.array_equal(
        tensors["output.weight"].data, tensors["token_embd.weight"].data
    )
    return dict(
        vocab_size=int(tensors["token_embd.weight"].data.shape[0]),
        dim=dim,
        n_layers=int(_field(reader, "llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
        hidden_dim=int(_field(reader, "llama.feed_forward_length")),
        max_seq_len=int(_field(reader, "llama.context_length", 2048)),
        rope_base=float(_field(reader, "llama.rope.freq_base", 10_000.0)),
        norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings=bool(tied),
        head_dim=int(_field(reader, "llama.rope.dimension_count", dim // n_heads)),
    )


def from_gguf(path: str, quantize_base: bool = False) -> TransformerDecoder:
    """Build the model a GGUF file describes (weights are loaded by `GGUFCheckpointer`)."""
    return transformer_decoder(quantize_base=quantize_base, **gguf_model_sizes(path))


def lora_from_gguf(
    path: str,
    lora_attn_modules: Sequence[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    quantize_base: bool = False,
    use_dora: bool = False,
) -> TransformerDecoder:
    """`from_gguf` with LoRA adapters; the LoRA arguments as for `lora_transformer_decoder`."""
    return lora_transformer_decoder(
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        lora_rank,
        lora_alpha,
        lora_dropout,
        quantize_base,
        use_dora,
        **gguf_model_sizes(path),
    )


class GGUFCheckpointer:
    """Load float weights from a GGUF file into a materialized ftcore model."""

    def __init__(self, path: str, output_dir: str | None = None):
        self.path = Path(path)
        self.output_dir = output_dir

    def load_into(self, model: TransformerDecoder) -> None:
        reader = _reader(self.path)
        n_heads = model.layers[0].attn.n_heads
        n_kv_heads = model.layers[0].attn.n_kv_heads
        loader = TensorLoader(model, source=str(self.path))
        embedding = None
        for tensor in reader.tensors:
            key = gguf_to_ftcore(tensor.name)
            value = _tensor_to_torch(tensor)
            if key.endswith("attn.q_proj.weight"):
                value = interleaved_to_halves(value, n_heads)
            elif key.endswith("attn.k_proj.weight"):
                value = interleaved_to_halves(value, n_kv_heads)
            if key == "tok_embeddings.weight":
                embedding = value
            if key == "output.weight" and model.tied_embeddings:
                continue  # checked below: a tied model may only skip a copy of the embedding
            with torch.no_grad():
                loader.load(key, value, source_key=tensor.name)
        if model.tied_embeddings and "output.weight" in {t.name for t in reader.tensors}:
            output = _tensor_to_torch(next(t for t in reader.tensors if t.name == "output.weight"))
            if embedding is None or not torch.equal(output, embedding):
                raise ValueError(
                    f"{self.path}: output.weight differs from token_embd.weight but the model ties them; "
                    "build the model with tie_embeddings=False (ftcore.models.from_gguf does this)"
                )
        loader.finish()
        reset_buffers(model)

    def save(self, state_dict: dict[str, torch.Tensor], output_dir: str | None = None) -> Path:
        """GGUF is read-only here: fine-tuned weights are written in Hugging Face layout, with a
        config.json derived from the GGUF metadata and the embedded vocabulary as a `tokenizer.model`,
        so `transformers` (and llama.cpp's converter) read them."""
        target = output_dir if output_dir is not None else self.output_dir
        if target is None:
            raise ValueError("GGUFCheckpointer.save needs an output_dir (argument or constructor)")
        config = hf_config_from_sizes(gguf_model_sizes(self.path))
        return write_hf_checkpoint(state_dict, Path(target), config, extra_files=_tokenizer_files(self.path))


def _tokenizer_files(path: Path) -> dict[str, bytes]:
    tokenizer = gguf_tokenizer(str(path))
    return {
        "tokenizer.model": sentencepiece_model_bytes(tokenizer),
        "tokenizer_config.json": tokenizer_config_json(tokenizer),
    }
