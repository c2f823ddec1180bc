"""dsmoe.quant.state reads and writes a 4-bit quant state as bitsandbytes does, without importing it.

Every expected value is bitsandbytes' own: its codebooks, ``QuantState.from_dict`` and
``as_dict(packed=True)``; the last test checks in a fresh process that a stored 4-bit load leaves
bitsandbytes unimported (it was 2 s of every load).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsmoe.quant import QuantSpec
from dsmoe.quant.convert import quantize_checkpoint
from dsmoe.quant.state import FourBitState, NestedState, codebook, is_standard_codebook, state_from_tensors

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
bnb = pytest.importorskip("bitsandbytes")
BF = bnb.functional


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_the_codebooks_are_bitsandbytes_values_to_the_bit(quant_type: str) -> None:
    ours, theirs = codebook(quant_type), BF.get_4bit_type(quant_type, device="cpu")
    assert ours.dtype == theirs.dtype == torch.float32
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))


def _bnb_state(quant_type: str, double_quant: bool) -> tuple[dict[str, torch.Tensor], object]:
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(3)).bfloat16()
    _, state = BF.quantize_4bit(weight, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    return state.as_dict(packed=True), state


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_a_saved_state_reads_as_bitsandbytes_reads_it(quant_type: str, double_quant: bool) -> None:
    saved, _ = _bnb_state(quant_type, double_quant)
    theirs = BF.QuantState.from_dict(dict(saved), device=torch.device("cpu"))
    ours = state_from_tensors(dict(saved))
    assert (ours.shape, ours.quant_type, ours.blocksize, ours.dtype, ours.nested) == (
        theirs.shape, theirs.quant_type, theirs.blocksize, theirs.dtype, theirs.nested)
    assert torch.equal(ours.absmax, theirs.absmax) and torch.equal(ours.code, theirs.code)
    if double_quant:
        assert ours.state2 is not None and ours.offset is not None
        assert (ours.state2.blocksize, ours.state2.dtype) == (theirs.state2.blocksize, theirs.state2.dtype)
        assert torch.equal(ours.state2.absmax, theirs.state2.absmax)
        assert torch.equal(ours.state2.code, theirs.state2.code)
        assert float(ours.offset) == float(theirs.offset)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_a_state_saves_bitsandbytes_bytes(quant_type: str, double_quant: bool) -> None:
    saved, state = _bnb_state(quant_type, double_quant)
    nested = None
    if double_quant:
        nested = NestedState(state.state2.absmax, state.state2.code, state.state2.blocksize, state.state2.dtype)
    ours = FourBitState(shape=state.shape, quant_type=quant_type, blocksize=state.blocksize, dtype=state.dtype,
                        absmax=state.absmax, code=state.code, offset=state.offset, state2=nested).as_tensors()
    assert list(ours) == list(saved)
    for key, tensor in saved.items():
        assert ours[key].dtype == tensor.dtype and torch.equal(ours[key], tensor), key


def _packed(fields: object) -> torch.Tensor:
    return torch.tensor(list(json.dumps(fields).encode()), dtype=torch.uint8)


def test_states_bitsandbytes_would_refuse_are_refused() -> None:
    saved, _ = _bnb_state("nf4", False)
    key = "quant_state.bitsandbytes__nf4"
    fields = json.loads(bytes(saved[key].numpy()))
    cases = {
        "no packed state": {k: v for k, v in saved.items() if k != key},
        "two packed states": {**saved, "quant_state.bitsandbytes__fp4": saved[key]},
        "not JSON": {**saved, key: torch.tensor([0xFF, 0x00], dtype=torch.uint8)},
        "a JSON list": {**saved, key: _packed([1, 2])},
        "an unknown field": {**saved, key: _packed({**fields, "colour": "red"})},
        "an unknown tensor": {**saved, "offsets": torch.zeros(1)},
        "no blocksize": {**saved, key: _packed({k: v for k, v in fields.items() if k != "blocksize"})},
        "no absmax": {k: v for k, v in saved.items() if k != "absmax"},
        "not a dtype": {**saved, key: _packed({**fields, "dtype": "Tensor"})},
    }
    for case, parts in cases.items():
        with pytest.raises(ValueError):
            state_from_tensors(parts)
            pytest.fail(case)


def test_a_stored_4bit_load_does_not_import_bitsandbytes(tmp_path: Path, tiny_path: Path) -> None:
    stored = tmp_path / "tiny-nf4"
    quantize_checkpoint(tiny_path, stored, QuantSpec(bits=4, quant_type="nf4"))
    probe = ("import sys; from dsmoe.loading import load; model, _ = load(sys.argv[1]); "
             "print(type(model.model.layers[0].self_attn.q_proj).__name__, 'bitsandbytes' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe, str(stored)], check=True, capture_output=True, text=True)
    assert done.stdout.split() == ["Linear4bit", "False"]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_the_codebook_check_says_what_allclose_says(quant_type: str) -> None:
    standard = codebook(quant_type)
    generator = torch.Generator().manual_seed(0)
    candidates = [standard, standard * 2, standard[:15], standard.view(4, 4), standard.to(torch.bfloat16)]
    for scale in (1e-7, 5e-7, 2e-6, 1e-5):
        candidates += [standard + torch.randn(16, generator=generator) * scale for _ in range(5)]
    nan = standard.clone()
    nan[3] = float("nan")
    candidates.append(nan)
    for code in candidates:
        peer = code.shape == standard.shape and torch.allclose(code.float(), standard, atol=1e-6)
        assert is_standard_codebook(code, quant_type) == peer
    assert is_standard_codebook(standard, quant_type)
    assert not is_standard_codebook(standard * 2, quant_type)
