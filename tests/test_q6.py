"""dsmoe's 6-bit lm_head format (quant/q6.py, native/q6.c): the layout by hand, the native
quantizer byte for byte against the torch reference, the kernel against float64 sums of the
dequantized weight, and the q6 head as the default of 4-bit runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsmoe import load
from dsmoe.errors import UsageError
from dsmoe.loading import LoadOptions
from dsmoe.native.library import ISA_AVX2, ISA_VNNI
from dsmoe.quant import Linear6bit, Linear8bit, QuantSpec, linear_from_tensors, quantize_linear, quantized_tensors
from dsmoe.quant.convert import quantize_checkpoint
from dsmoe.quant.q6 import dequantize_q6, q6_native_mm, quantize_q6, quantize_q6_native
from dsmoe.quant.spec import Q6, quantization_config, spec_from_config
from test_native_kernels import _rounded_activations

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def test_layout_by_hand() -> None:
    """One block on the grid of step 0.5 (absmax 15.5 = 31 * 0.5): codes u = q + 32 = (j % 63) + 1."""
    q = torch.tensor([(j % 63) - 31 for j in range(64)], dtype=torch.float32)
    packed, steps = quantize_q6(q.view(1, 64) * 0.5)
    assert steps.tolist() == [[0.5]] and packed.shape == (1, 48)
    b = packed[0].tolist()
    assert b[0] == 0x11  # u[0] = 1 low, u[32] = 33 -> 1 high
    assert b[31] == 0x10  # u[31] = 32 low (0), u[63] = 1 high (j = 63 wraps to q = -31)
    assert b[32] == 0b11_10_01_00  # top bits of u[0] = 1, u[16] = 17, u[32] = 33, u[48] = 49
    assert torch.equal(dequantize_q6(packed, steps), q.view(1, 64) * 0.5)  # on the grid: exact


def _weights(dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    w = torch.randn(40, 256, generator=generator) * 0.05
    w[1, :64] = 0  # an all-zero block: step 0, codes 32
    w[2, 64:128] = torch.arange(64) - 31.5  # halves of the step: ties of the rounding
    w[3, :10] *= 40  # an outlier block beside ordinary ones
    w[4, 128:192] *= 1e-4 if dtype == torch.float16 else 1e-6  # subnormal fp16 steps
    w[5, :] = torch.linspace(-1, 1, 256)
    # absmax / 31 = 1.00244140625 exactly: halfway between fp16's 1.001953125 (even) and 1.0029296875
    w[6, 0] = 31.07568359375
    return w.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_native_quantizer_matches_the_reference(lib, dtype: torch.dtype) -> None:
    w = _weights(dtype)
    packed, steps = quantize_q6_native(lib, w)
    want_packed, want_steps = quantize_q6(w)
    assert torch.equal(steps.view(torch.int16), want_steps.view(torch.int16))
    assert torch.equal(packed, want_packed), f"{int((packed != want_packed).sum())} bytes differ"
    if dtype == torch.float32:
        assert want_steps[6, 0].item() == 1.001953125  # the tie went to the even step
    # The rounding itself: every value within half a step of its code (the fp16 step is within 2^-11
    # of absmax / 31, so nothing but +-absmax reaches the clamp); a block whose step rounds to 0 in
    # fp16 (absmax / 31 under 2^-25) is all zeros.
    step = want_steps.float().repeat_interleave(64, dim=1)
    error = (dequantize_q6(packed, steps) - w.float()).abs()
    assert (error <= torch.where(step > 0, step / 2 * (1 + 1e-6), torch.full_like(step, 31 * 2.0**-25))).all()


def test_steps_that_overflow_fp16_are_refused(lib) -> None:
    w = torch.zeros(2, 64)
    w[1, 3] = 65504.0 * 32
    with pytest.raises(UsageError, match="too large"):
        quantize_q6(w)
    with pytest.raises(UsageError, match="too large"):
        quantize_q6_native(lib, w)


@pytest.mark.parametrize("isa", [ISA_VNNI, ISA_AVX2], ids=["vnni", "avx2"])
@pytest.mark.parametrize("shape", [(37, 128), (96, 256), (2048, 64 * 11)], ids=str)
def test_kernel_computes_the_rounded_product(lib, isa: int, shape: tuple[int, int]) -> None:
    used = lib.dsmoe_native_use_isa(isa)
    try:
        if used != isa:
            pytest.skip("this CPU has no AVX512-VNNI")
        w = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0])) * 0.05
        w[1, :5] *= 30
        packed, steps = quantize_q6(w)
        x = torch.randn(3, shape[1], generator=torch.Generator().manual_seed(1)).bfloat16()
        x[0, :3] *= 50
        want = (_rounded_activations(x).double() @ dequantize_q6(packed, steps).double().t()).float()
        for rows in (1, 3):
            got = q6_native_mm(lib, x[:rows], packed, steps, torch.float32)
            torch.testing.assert_close(got, want[:rows], rtol=1e-5, atol=1e-5 * want.abs().max().item())
            assert torch.equal(q6_native_mm(lib, x[:rows], packed, steps), got.bfloat16())
    finally:
        lib.dsmoe_native_use_isa(-1)


def test_both_instruction_sets_give_the_same_numbers(lib) -> None:
    if lib.dsmoe_native_use_isa(ISA_VNNI) != ISA_VNNI:
        lib.dsmoe_native_use_isa(-1)
        pytest.skip("this CPU has no AVX512-VNNI")
    packed, steps = quantize_q6(torch.randn(160, 512, generator=torch.Generator().manual_seed(3)))
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(4)).bfloat16()
    try:
        vnni = q6_native_mm(lib, x, packed, steps, torch.float32)
        lib.dsmoe_native_use_isa(ISA_AVX2)
        avx2 = q6_native_mm(lib, x, packed, steps, torch.float32)
    finally:
        lib.dsmoe_native_use_isa(-1)
    assert torch.equal(vnni, avx2)


def test_layer_round_trips_its_tensors_and_falls_back_to_torch(lib, monkeypatch: pytest.MonkeyPatch) -> None:
    weight = torch.randn(96, 192, generator=torch.Generator().manual_seed(5)).bfloat16()
    layer = quantize_linear(weight, Q6, torch.bfloat16)
    assert isinstance(layer, Linear6bit) and layer.kernel(1) == "q6_native"
    tensors = quantized_tensors(layer, "lm_head")
    assert set(tensors) == {"lm_head.weight", "lm_head.weight.q6_steps"}
    again = linear_from_tensors(tensors, "lm_head", QuantSpec(bits=4, quantize_lm_head=True, lm_head="q6"),
                                torch.bfloat16)
    assert isinstance(again, Linear6bit) and torch.equal(again.weight, layer.weight)
    x = torch.randn(3, 192, generator=torch.Generator().manual_seed(6)).bfloat16()
    native = layer(x).float()
    monkeypatch.setattr("dsmoe.quant.linear.native_library", lambda: None)
    peer = quantize_linear(weight, Q6, torch.bfloat16)
    assert peer.kernel(1) == "dequant_matmul" and torch.equal(peer.weight, layer.weight)  # the torch quantizer
    floats = peer(x).float()
    assert ((native - floats).norm() / floats.norm()).item() < 0.01  # int8 activations against bf16


def test_q6_is_the_head_of_4_bit_runs(tiny_path: Path, tmp_path: Path) -> None:
    def head(*args: object, **settings: object) -> torch.nn.Module:
        return load(*args, no_cache=True, **settings)[0].lm_head  # type: ignore[arg-type]

    assert isinstance(head(tiny_path, bits=4), Linear6bit)
    assert isinstance(head(tiny_path, bits=8), Linear8bit)
    assert isinstance(head(tiny_path, bits=4, lm_head="int8"), Linear8bit)
    assert isinstance(head(tiny_path, bits=8, lm_head="q6"), Linear6bit)
    assert isinstance(head(tiny_path, lm_head="q6"), Linear6bit)  # asked for alone
    with pytest.raises(UsageError, match="--lm-head must be one of int8, q6"):
        LoadOptions(bits=4, lm_head="q4")
    with pytest.raises(UsageError, match="--lm-head quantizes lm_head"):
        LoadOptions(bits=4, lm_head="q6", quantize_lm_head=False)
    # A stored 4-bit checkpoint with the q6 head: dsmoe's config key, the head read as stored.
    stored = tmp_path / "nf4-q6"
    quantize_checkpoint(tiny_path, stored, LoadOptions(bits=4, quantize_lm_head=True).quant_spec())  # type: ignore[arg-type]
    config = json.loads((stored / "config.json").read_text())["quantization_config"]
    assert config["dsmoe_lm_head"] == "q6" and "dsmoe_lm_head_int8" not in config
    assert isinstance(head(stored), Linear6bit)
    with pytest.raises(UsageError, match="another format than int8"):
        head(stored, lm_head="int8")
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.inference_mode():
        from_file = load(stored)[0](ids)
        direct = load(tiny_path, bits=4, no_cache=True)[0](ids)
    assert torch.equal(from_file, direct)


def test_config_names_the_q6_head() -> None:
    spec = QuantSpec(bits=4, quantize_lm_head=True, lm_head="q6")
    assert spec_from_config(quantization_config(spec)) == spec
    eight = QuantSpec(bits=8, quant_type="int8", quantize_lm_head=True, lm_head="q6")
    assert spec_from_config(quantization_config(eight)) == eight
