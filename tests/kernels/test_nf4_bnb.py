"""Loading the per-weight entries of a pre-quantized Hugging Face `bnb-4bit` checkpoint.

The state dict is written here by hand from bitsandbytes' documented layout (`QuantState.as_dict(packed=True)`):
packed uint8 (n/2, 1), absmax, quant_map, nested_absmax, nested_quant_map and a JSON quant_state tensor.
"""

from __future__ import annotations

import json

import pytest
import torch

from ftcore.kernels import nf4_bnb
from ftcore.kernels import nf4_reference as ref

KEY = "model.layers.0.self_attn.q_proj.weight"


def bnb_state_dict(w: torch.Tensor) -> dict[str, torch.Tensor]:
    parts = ref.quantize_nf4(w)
    quant_state = {
        "quant_type": "nf4",
        "blocksize": 64,
        "dtype": "bfloat16",
        "shape": list(w.shape),
        "nested_blocksize": 256,
        "nested_dtype": "float32",
        "nested_offset": parts.offset.item(),
    }
    return {
        KEY: parts.packed.reshape(-1, 1),
        KEY + ".absmax": parts.absmax,
        KEY + ".quant_map": torch.tensor(ref.NF4_CODE_VALUES, dtype=torch.float32),
        KEY + ".nested_absmax": parts.nested_absmax,
        KEY + ".nested_quant_map": ref.dynamic_map(),
        KEY + ".quant_state.bitsandbytes__nf4": torch.tensor(
            list(json.dumps(quant_state).encode()), dtype=torch.uint8
        ),
    }


def test_loads_and_dequantizes_like_the_reference():
    torch.manual_seed(0)
    w = torch.randn(64, 256, dtype=torch.bfloat16)
    state = bnb_state_dict(w)
    parts = nf4_bnb.load_bnb_4bit_state(KEY, state)
    assert parts.shape == w.shape and parts.dtype == torch.bfloat16
    assert torch.equal(ref.dequantize_nf4(parts), ref.dequantize_nf4(ref.quantize_nf4(w)))
    assert sorted(nf4_bnb.bnb_4bit_keys(KEY, state)) == sorted(state)
    assert nf4_bnb.is_bnb_4bit_state(KEY, state) and not nf4_bnb.is_bnb_4bit_state("other.weight", state)


def test_export_round_trips():
    w = torch.randn(32, 128, dtype=torch.bfloat16)
    parts = ref.quantize_nf4(w)
    again = nf4_bnb.load_bnb_4bit_state(KEY, nf4_bnb.to_bnb_4bit_state(KEY, parts))
    assert torch.equal(ref.dequantize_nf4(again), ref.dequantize_nf4(parts))


def test_rejects_fp4_and_incomplete_checkpoints():
    state = bnb_state_dict(torch.randn(8, 64))
    fp4 = dict(state)
    fp4[KEY + ".quant_state.bitsandbytes__fp4"] = fp4.pop(KEY + ".quant_state.bitsandbytes__nf4")
    with pytest.raises(ValueError, match="only bitsandbytes NF4"):
        nf4_bnb.load_bnb_4bit_state(KEY, fp4)
    del state[KEY + ".nested_absmax"]
    with pytest.raises(ValueError, match="nested_absmax"):
        nf4_bnb.load_bnb_4bit_state(KEY, state)
