"""Read the NF4 entries that a pre-quantized Hugging Face `bnb-4bit` checkpoint stores for one weight.

bitsandbytes' `QuantState.as_dict(packed=True)` writes, next to the packed `<key>` (uint8, (n/2, 1)):
`<key>.absmax` (uint8 with double quant, else fp32), `<key>.quant_map` (16 fp32 code values),
`<key>.nested_absmax` (fp32 per 256 absmax values), `<key>.nested_quant_map` (256 fp32 values), and
`<key>.quant_state.bitsandbytes__nf4`: a uint8 tensor of UTF-8 JSON with quant_type, blocksize, dtype
(a torch dtype name without "torch."), shape, and with double quant nested_blocksize, nested_dtype,
nested_offset. The bytes are ours as they are; only the JSON needs reading.
"""

from __future__ import annotations

import json
import warnings
from typing import cast

import torch

from ftcore.kernels import nf4_reference as ref

_STATE_SUFFIX = ".quant_state.bitsandbytes__nf4"
_TENSOR_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")


def is_bnb_4bit_state(key: str, state_dict: dict[str, torch.Tensor]) -> bool:
    """True when `key` is a packed bitsandbytes 4-bit weight (uint8 with its quant-state entries)."""
    return any(k.startswith(key + ".quant_state.bitsandbytes__") for k in state_dict)


def bnb_4bit_groups(keys: list[str]) -> dict[str, list[str]]:
    """{packed weight key: it and every entry that belongs to it} for the 4-bit weights among `keys`
    (one file's names); a checkpoint streams tensor by tensor, but a 4-bit weight loads as one set."""
    present = set(keys)
    groups = {}
    for key in keys:
        if key.endswith(_STATE_SUFFIX):
            weight = key[: -len(_STATE_SUFFIX)]
            groups[weight] = _entry_keys(weight, present)
    return groups


def bnb_4bit_keys(key: str, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Every state-dict key that belongs to the 4-bit weight `key`."""
    return _entry_keys(key, state_dict)


def _entry_keys(key: str, present) -> list[str]:
    return [key + s for s in ("", _STATE_SUFFIX, *_TENSOR_SUFFIXES) if key + s in present]


def _quant_state(key: str, state_dict: dict[str, torch.Tensor]) -> dict:
    if key + _STATE_SUFFIX not in state_dict:
        other = [k for k in state_dict if k.startswith(key + ".quant_state.")]
        raise ValueError(
            f"{key}: only bitsandbytes NF4 checkpoints load into NF4 layers, found {other or 'no quant_state'}; "
            "re-quantize the model with bnb_4bit_quant_type='nf4' or load its bf16 weights"
        )
    raw = state_dict[key + _STATE_SUFFIX]
    try:
        return json.loads(bytes(raw.cpu().to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{key + _STATE_SUFFIX}: not the UTF-8 JSON bitsandbytes writes ({error})"
        ) from error


def _dtype(name: str, key: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{key}{_STATE_SUFFIX}: unknown dtype {name!r} in the quant state")
    return dtype


def _require(key: str, state_dict: dict[str, torch.Tensor], suffix: str) -> torch.Tensor:
    if key + suffix not in state_dict:
        raise ValueError(
            f"{key}: bitsandbytes 4-bit weight is missing `{key + suffix}`; the checkpoint is incomplete"
        )
    return state_dict[key + suffix]


def _checked_absmax(
    key: str, state: dict, q_absmax: torch.Tensor, nested_absmax: torch.Tensor, nested_map: torch.Tensor
):
    """Absmax codes in our dynamic code; re-quantized (with a warning) if the file used another 8-bit code."""
    if state.get("nested_blocksize", ref.NESTED_BLOCK_SIZE) != ref.NESTED_BLOCK_SIZE:
        raise ValueError(
            f"{key}: nested_blocksize {state['nested_blocksize']} unsupported (bitsandbytes uses 256)"
        )
    if torch.equal(nested_map.float().cpu(), ref.dynamic_map()):
        return q_absmax.to(torch.uint8), nested_absmax.float()
    warnings.warn(
        f"{key}: nested_quant_map differs from the dynamic 8-bit code; re-quantizing its absmax", stacklevel=3
    )
    scale = nested_absmax.float().repeat_interleave(ref.NESTED_BLOCK_SIZE)[: q_absmax.numel()]
    absmax_centered = nested_map.float().to(q_absmax.device)[q_absmax.long()] * scale
    return ref.quantize_blockwise_8bit(absmax_centered)


def load_bnb_4bit_state(key: str, state_dict: dict[str, torch.Tensor]) -> ref.NF4Parts:
    """Build NF4Parts from the entries a `bnb-4bit` checkpoint stores for weight `key` (e.g. `...q_proj.weight`)."""
    state = _quant_state(key, state_dict)
    if state.get("quant_type") != "nf4":
        raise ValueError(f"{key}: quant_type {state.get('quant_type')!r} is not 'nf4'")
    quant_map = _require(key, state_dict, ".quant_map")
    if not torch.equal(quant_map.float().cpu(), ref.nf4_code()):
        raise ValueError(f"{key}.quant_map is not the NF4 code table; this is not an NF4 checkpoint")
    shape, block_size = torch.Size(state["shape"]), int(state["blocksize"])
    packed = _require(key, state_dict, "").reshape(-1)
    if packed.dtype != torch.uint8 or packed.numel() * 2 != shape.numel():
        raise ValueError(
            f"{key}: expected {shape.numel() // 2} packed uint8 bytes for shape {tuple(shape)}, "
            f"got {packed.numel()} of {packed.dtype} (only quant_storage=uint8 is supported)"
        )
    absmax = _require(key, state_dict, ".absmax").reshape(-1)
    if absmax.numel() != shape.numel() // block_size:
        raise ValueError(f"{key}.absmax has {absmax.numel()} values, expected {shape.numel() // block_size}")
    dtype = _dtype(state["dtype"], key)
    if "nested_offset" not in state:
        return ref.NF4Parts(packed, absmax.float(), None, None, shape, dtype, block_size)
    nested_map = _require(key, state_dict, ".nested_quant_map")
    q_absmax, nested = _checked_absmax(
        key, state, absmax, _require(key, state_dict, ".nested_absmax"), nested_map
    )
    offset = torch.tensor(float(state["nested_offset"]), dtype=torch.float32, device=packed.device)
    return ref.NF4Parts(packed, q_absmax, nested, offset, shape, dtype, block_size)


def to_bnb_4bit_state(key: str, parts: ref.NF4Parts) -> dict[str, torch.Tensor]:
    """The inverse: the entries bitsandbytes would save for `parts` (used to export and in tests)."""
    state = {
        "quant_type": "nf4",
        "blocksize": parts.block_size,
        "dtype": str(parts.dtype).removeprefix("torch."),
    }
    state["shape"] = list(parts.shape)
    out = {
        key: parts.packed.reshape(-1, 1),
        key + ".absmax": parts.absmax,
        key + ".quant_map": ref.nf4_code().clone(),
    }
    if parts.double_quant:  # nested_absmax and offset are both set
        out[key + ".nested_absmax"] = cast(torch.Tensor, parts.nested_absmax)
        out[key + ".nested_quant_map"] = ref.dynamic_map().clone()  # the cached table is shared
        state.update(
            nested_blocksize=ref.NESTED_BLOCK_SIZE,
            nested_dtype="float32",
            nested_offset=cast(torch.Tensor, parts.offset).item(),
        )
    out[key + _STATE_SUFFIX] = torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)
    return out
