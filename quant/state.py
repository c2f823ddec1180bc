"""A 4-bit weight's quantization state and the formats' codebooks, without importing bitsandbytes.

Importing bitsandbytes costs about 2 s (it pulls in torch._dynamo), which was a quarter of a stored
8-layer checkpoint's load, although reading a 4-bit tensor needs only its codebook and a few fields
of JSON. The values and the JSON are bitsandbytes' own (``get_4bit_type``, ``QuantState.from_dict``
and ``as_dict(packed=True)``); tests/test_quant_state.py holds them to bitsandbytes.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import torch

NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
"""NormalFloat4 (QLoRA), as bitsandbytes stores it: fp32 values, code 7 is zero."""

_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
FP4_CODE = tuple(v / 12 for v in _FP4_MAGNITUDES) + tuple(-v / 12 if v else 0.0 for v in _FP4_MAGNITUDES)
"""bitsandbytes' FP4 (E2M1 with its own bit order): codes 0-7 positive, 8-15 their negatives (code 8
a positive zero, as bitsandbytes has it), over 12."""

_CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
_STATE_KEY = "quant_state.bitsandbytes__"


def codebook(quant_type: str) -> torch.Tensor:
    """The 16 fp32 values of a 4-bit format, a new tensor each call (callers may keep it)."""
    return torch.tensor(_CODES[quant_type], dtype=torch.float32)


@functools.cache
def _codebook_values(quant_type: str) -> tuple[float, ...]:
    return tuple(codebook(quant_type).tolist())


def is_standard_codebook(code: torch.Tensor, quant_type: str) -> bool:
    """Whether a stored ``quant_map`` is the format's codebook, as ``torch.allclose(code, codebook,
    atol=1e-6)`` says, but on 16 Python floats: allclose took ~170 us a call, 0.24 s of an 8-layer
    load's 1400 linears."""
    standard = _codebook_values(quant_type)
    values = code.tolist() if code.dim() == 1 else []
    return len(values) == len(standard) and all(abs(a - b) <= 1e-6 + 1e-5 * abs(b) for a, b in zip(values, standard))


@dataclass(frozen=True)
class NestedState:
    """Double quantization: the block absmax, themselves 8-bit blockwise quantized."""

    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    dtype: torch.dtype


@dataclass(frozen=True)
class FourBitState:
    """What a 4-bit linear keeps of bitsandbytes' QuantState, under the same attribute names, so either
    serves ``Linear4bit``."""

    shape: torch.Size
    quant_type: str
    blocksize: int
    dtype: torch.dtype
    absmax: torch.Tensor
    code: torch.Tensor
    offset: torch.Tensor | None = None
    state2: NestedState | None = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    def as_tensors(self) -> dict[str, torch.Tensor]:
        """The state as transformers saves it beside ``X.weight`` (keys relative to ``X.weight.``)."""
        fields: dict[str, Any] = {"quant_type": self.quant_type, "blocksize": self.blocksize,
                                  "dtype": _dtype_name(self.dtype), "shape": list(self.shape)}
        tensors = {"absmax": self.absmax, "quant_map": self.code}
        if self.state2 is not None:
            assert self.offset is not None  # a nested state always has its offset
            tensors.update(nested_absmax=self.state2.absmax, nested_quant_map=self.state2.code.clone())
            fields.update(nested_blocksize=self.state2.blocksize, nested_dtype=_dtype_name(self.state2.dtype),
                          nested_offset=float(self.offset))
        packed = json.dumps(_in_bitsandbytes_order(fields)).encode("utf-8")
        tensors[_STATE_KEY + self.quant_type] = torch.tensor(list(packed), dtype=torch.uint8)
        return tensors


def state_from_tensors(parts: dict[str, torch.Tensor]) -> FourBitState:
    """A 4-bit state from the tensors transformers saves beside ``X.weight`` (keys relative to
    ``X.weight.``), read as bitsandbytes' ``QuantState.from_dict`` reads them. Raises ValueError on
    anything else (the caller names the tensor)."""
    packed = [key for key in parts if key.startswith(_STATE_KEY)]
    if len(packed) != 1:
        raise ValueError(f"expected one {_STATE_KEY}<nf4|fp4> tensor, found {len(packed)}")
    try:
        fields = json.loads(bytes(parts[packed[0]].numpy()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"its JSON is unreadable ({exc})") from None
    if not isinstance(fields, dict):
        raise ValueError("its JSON is not an object")
    tensors = {key: value for key, value in parts.items() if key != packed[0]}
    unknown = set(fields) - _JSON_KEYS | set(tensors) - _TENSOR_KEYS
    if unknown:
        raise ValueError(f"unexpected entries {sorted(unknown)}")
    try:
        offset, state2 = None, None
        if "nested_absmax" in tensors:
            offset = torch.tensor(float(fields["nested_offset"]))
            state2 = NestedState(tensors["nested_absmax"], tensors["nested_quant_map"],
                                 int(fields["nested_blocksize"]), _dtype(fields["nested_dtype"]))
        shape = fields["shape"]
        return FourBitState(
            shape=torch.Size(shape) if shape is not None else torch.Size(), quant_type=str(fields["quant_type"]),
            blocksize=int(fields["blocksize"]), dtype=_dtype(fields["dtype"]), absmax=tensors["absmax"],
            code=tensors["quant_map"], offset=offset, state2=state2)
    except KeyError as exc:
        raise ValueError(f"{exc.args[0]!r} is missing") from None
    except TypeError as exc:
        raise ValueError(str(exc)) from None


_JSON_KEYS = {"quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"}
_TENSOR_KEYS = {"absmax", "quant_map", "nested_absmax", "nested_quant_map"}
"""bitsandbytes' tensors; ``checkpoint.lazy.NATIVE_SCALES`` is dsmoe's and not part of the state."""
_JSON_ORDER = ("quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset")


def _in_bitsandbytes_order(fields: dict[str, Any]) -> dict[str, Any]:
    """The keys in the order ``as_dict`` writes them, so the JSON bytes are bitsandbytes' own."""
    return {key: fields[key] for key in _JSON_ORDER if key in fields}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: Any) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a dtype")
    return dtype
