"""Write a GGUF file's SentencePiece-style vocabulary as a `tokenizer.model`, for saved checkpoints.

A model fine-tuned from a GGUF base is saved in Hugging Face layout; without a tokenizer file beside
the weights neither `transformers` nor llama.cpp's HF-to-GGUF converter can use the folder. The
vocabulary (pieces, scores, token types) is all a BPE `tokenizer.model` holds, so it is written here
as that protobuf, encoded by hand (the `protobuf` package is not a dependency). Field numbers are those
of sentencepiece's `sentencepiece_model.proto`; the normalizer settings are Llama 2's (identity
normalization, a dummy prefix space, whitespace kept), which is how `GGUFTokenizer` encodes.
"""

from __future__ import annotations

import json
import struct

from ftcore.data.tokenizers.gguf import TOKEN_TYPE_UNKNOWN, GGUFTokenizer

_VARINT, _FIXED32, _BYTES = 0, 5, 2
_BPE = 2  # TrainerSpec.ModelType


def sentencepiece_model_bytes(tokenizer: GGUFTokenizer) -> bytes:
    """The serialized ModelProto: pieces, then the trainer spec, then the normalizer spec."""
    pieces = b"".join(
        _bytes_field(1, _piece(piece, score, kind))
        for piece, score, kind in zip(tokenizer.pieces, tokenizer.scores, tokenizer.token_types)
    )
    trainer = b"".join(
        [
            _varint_field(3, _BPE),
            _varint_field(4, tokenizer.vocab_size),
            _varint_field(35, int(bool(tokenizer.byte_to_id))),  # byte_fallback
            _varint_field(40, _unk_id(tokenizer)),
            _varint_field(41, tokenizer.bos_id),
            _varint_field(42, tokenizer.eos_id),
            _varint_field(43, -1),  # pad_id: none in the vocabulary (ftcore pads with unk, as Llama 2 does)
        ]
    )
    normalizer = b"".join(
        [
            _bytes_field(1, b"identity"),
            _varint_field(3, 1),  # add_dummy_prefix
            _varint_field(4, 0),  # remove_extra_whitespaces
            _varint_field(5, 1),  # escape_whitespaces
        ]
    )
    return pieces + _bytes_field(2, trainer) + _bytes_field(3, normalizer)


def tokenizer_config_json(tokenizer: GGUFTokenizer) -> bytes:
    """What `transformers.AutoTokenizer` reads beside a `tokenizer.model`."""
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": tokenizer.pieces[tokenizer.bos_id],
        "eos_token": tokenizer.pieces[tokenizer.eos_id],
        "unk_token": tokenizer.pieces[_unk_id(tokenizer)],
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,  # SentencePiece's own behaviour, which GGUFTokenizer follows
    }
    return (json.dumps(config, indent=2) + "\n").encode()


def _unk_id(tokenizer: GGUFTokenizer) -> int:
    types = tokenizer.token_types
    return types.index(TOKEN_TYPE_UNKNOWN) if TOKEN_TYPE_UNKNOWN in types else 0


def _piece(piece: str, score: float, kind: int) -> bytes:
    return (
        _bytes_field(1, piece.encode("utf-8"))
        + _key(2, _FIXED32)
        + struct.pack("<f", score)
        + _varint_field(3, kind)  # GGUF's token types are SentencePiece's piece types
    )


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _varint_field(field: int, value: int) -> bytes:
    return _key(field, _VARINT) + _varint(value)


def _bytes_field(field: int, payload: bytes) -> bytes:
    return _key(field, _BYTES) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32s are written as ten-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)
