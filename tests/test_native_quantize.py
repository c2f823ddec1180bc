"""The native quantizer gives bitsandbytes' bytes: NF4/FP4 packed codes and absmax exactly as
``bitsandbytes.functional.quantize_4bit`` computes them, and LLM.int8 rows exactly as the PyTorch
``quantize_int8``, on random and on adversarial inputs (midpoint ties, zeros, outliers, ragged
blocks). The expected values are always the peer code's own output, or a hand computation."""

from __future__ import annotations

import pytest
import torch
from bitsandbytes.functional import quantize_4bit
from hypothesis import given, settings
from hypothesis import strategies as st

from dsmoe.quant import linear
from dsmoe.quant.linear import (codebook_buckets, quantize_4bit_native, quantize_int8, quantize_int8_native,
                                quantize_linear)
from dsmoe.quant.spec import QuantSpec

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def assert_4bit_matches(lib, x: torch.Tensor, blocksize: int, quant_type: str) -> None:
    packed, state = quantize_4bit(x.reshape(1, -1), blocksize=blocksize, quant_type=quant_type)
    ours, absmax = quantize_4bit_native(lib, x.reshape(-1), blocksize, quant_type)
    assert torch.equal(absmax, state.absmax), f"absmax differ at {(absmax != state.absmax).nonzero()[:5].tolist()}"
    assert torch.equal(ours, packed), f"{int((ours != packed).sum())} packed bytes differ"


def test_hand_computed_nf4_block(lib) -> None:
    # absmax 1; NF4 codes: 1.0 is 15, 0.0 is 7, -1.0 is 0, and 0.5 lies below the midpoint
    # (0.4407 + 0.5626) / 2 = 0.5017, so it takes 12 (0.4407). Two codes a byte, first high.
    packed, absmax = quantize_4bit_native(lib, torch.tensor([1.0, 0.0, -1.0, 0.5] + [0.0] * 60), 64, "nf4")
    assert absmax.tolist() == [1.0]
    assert packed[:2, 0].tolist() == [0xF7, 0x0C]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 4096])
def test_random_weights_match_bitsandbytes(lib, dtype: torch.dtype, quant_type: str, blocksize: int) -> None:
    generator = torch.Generator().manual_seed(blocksize)
    for n in (blocksize * 5, blocksize * 5 + 2, blocksize * 3 + 7, 1, 4097):  # whole, ragged, odd, tiny
        assert_4bit_matches(lib, torch.randn(n, generator=generator).to(dtype), blocksize, quant_type)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("scale", [1.0, 4.0, 2.0**-20])
def test_values_exactly_on_midpoints_take_bitsandbytes_side(lib, quant_type: str, scale: float) -> None:
    """With absmax a power of two each midpoint times it is exact, so every value scales onto a
    midpoint (a tie), or one fp32 step either side of one."""
    midpoints, _ = codebook_buckets(quant_type)
    ties = midpoints * scale
    below, above = torch.nextafter(ties, torch.tensor(-1.0)), torch.nextafter(ties, torch.tensor(1.0))
    block = torch.cat([torch.tensor([scale]), ties, below, above, torch.zeros(64 - 1 - 3 * ties.numel())])
    assert_4bit_matches(lib, block.float(), 64, quant_type)
    assert_4bit_matches(lib, torch.cat([block, block[:40]]).float(), 64, quant_type)  # ties in a ragged block too


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_zeros_outliers_and_ragged_blocks(lib, dtype: torch.dtype, quant_type: str) -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64 * 6 + 37, generator=generator)
    x[64:128] = 0  # an all-zero full block: absmax 0
    x[130] = 0.0
    x[200] = torch.finfo(dtype).max  # the largest finite value beside small ones
    x[260] = -1e4
    x[300:310] = 1e-7  # fp16 subnormals, and values that vanish beside an outlier
    x[320] = torch.finfo(dtype).max
    x[321] = -torch.finfo(dtype).max
    assert_4bit_matches(lib, x.to(dtype), 64, quant_type)
    assert_4bit_matches(lib, torch.zeros(64 * 2 + 10, dtype=dtype), 64, quant_type)  # all-zero ragged block too
    assert_4bit_matches(lib, torch.full((127,), -0.0, dtype=dtype), 64, quant_type)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=700),
       blocksize=st.sampled_from([32, 64, 128, 256]), quant_type=st.sampled_from(["nf4", "fp4"]),
       dtype=st.sampled_from(DTYPES))
def test_fuzzed_inputs_match_bitsandbytes(lib, values: list[float], blocksize: int, quant_type: str,
                                          dtype: torch.dtype) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    if dtype != torch.float32:  # keep inside the type's range: an overflow to inf is no input of its
        x = x.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
    assert_4bit_matches(lib, x, blocksize, quant_type)


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_rows_match_quantize_int8(lib, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(2)
    w = torch.randn(70, 192, generator=generator)
    w[3] = 0  # an all-zero row stays zero
    w[4] = 0
    w[4, 5] = 1e-39 if dtype != torch.float16 else 6e-8  # a subnormal absmax: 127 / SCB overflows to inf
    w[5] *= 1e-37 if dtype != torch.float16 else 1e-4
    w[6, :] = torch.arange(192) - 95.5  # values k + 0.5 under absmax 95.5: ties of the rounding
    w[7, 0] = torch.finfo(dtype).max
    w = w.to(dtype)
    expected_q, expected_scb = quantize_int8(w)
    q, scb = quantize_int8_native(lib, w)
    assert torch.equal(scb, expected_scb)
    assert torch.equal(q, expected_q), f"{int((q != expected_q).sum())} values differ"
    assert q[3].abs().sum() == 0 and q[4, 5] == 127 and q[4].abs().sum() == 127


@pytest.mark.parametrize("spec", [QuantSpec(bits=4), QuantSpec(bits=4, quant_type="fp4", blocksize=128),
                                  QuantSpec(bits=4, double_quant=True), QuantSpec(bits=8, quant_type="int8")],
                         ids=lambda s: f"{s.name}-{s.blocksize}")
def test_quantize_linear_stores_what_the_peer_path_stores(lib, spec: QuantSpec,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """quantize_linear takes the native path where the library is, bitsandbytes' and PyTorch's
    where it is not, and the checkpoint tensors (double quantization included) are the same."""
    weight = torch.randn(96, 320, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    called = []
    real = linear.quantize_4bit_native if spec.bits == 4 else linear.quantize_int8_native
    monkeypatch.setattr(linear, real.__name__, lambda *a: called.append(1) or real(*a))
    native = quantize_linear(weight, spec, torch.float32).checkpoint_tensors()
    assert called, "the native quantizer was not used"
    monkeypatch.setattr(linear, "native_library", lambda: None)
    peer = quantize_linear(weight, spec, torch.float32).checkpoint_tensors()
    assert native.keys() == peer.keys()
    for name in native:
        assert torch.equal(native[name], peer[name]), name
