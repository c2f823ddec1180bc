"""dsmoe.quant formats: numbers equal bitsandbytes' dequantization, files match transformers' layout."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dsmoe.errors import CheckpointError, UsageError
from dsmoe.native.library import native_kernels_in_use, native_library
from dsmoe.quant import (
    Linear4bit,
    Linear8bit,
    QuantSpec,
    linear_from_tensors,
    quantization_config,
    quantize_linear,
    quantize_model,
    quantized_tensors,
    should_quantize,
    spec_for,
    spec_from_config,
)
from dsmoe.quant import kernels

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
bnb = pytest.importorskip("bitsandbytes")
BF = bnb.functional
pytestmark = pytest.mark.threads(1)

SPECS = {
    "nf4": QuantSpec(bits=4, quant_type="nf4"),
    "fp4": QuantSpec(bits=4, quant_type="fp4"),
    "nf4-dq": QuantSpec(bits=4, quant_type="nf4", double_quant=True),
    "fp4-dq": QuantSpec(bits=4, quant_type="fp4", double_quant=True),
    "int8": QuantSpec(bits=8, quant_type="int8"),
}


OUT, IN = 96, 256  # 96 rows: three tiles of bitsandbytes' CPU layout; 256 columns: four 64-blocks


def _weight(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(OUT, IN, generator=gen) * 0.05
    w[3, :7] *= 40  # outliers, so blocks and rows get different scales
    return w.to(dtype)


def _inputs(rows: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, IN, generator=torch.Generator().manual_seed(seed))


def _bnb_reference(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """dequant(W) as bitsandbytes computes it from its own quantization of ``weight`` (fp32)."""
    if spec.bits == 8:
        cb, scb, _ = BF.int8_vectorwise_quant(weight.float().clone())
        return BF.int8_vectorwise_dequant(cb, scb)
    packed, state = BF.quantize_4bit(weight, blocksize=64, compress_statistics=spec.double_quant,
                                     quant_type=spec.quant_type)
    state.dtype = torch.float32
    return BF.dequantize_4bit(packed, state)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---- spec, policy, config ------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"bits": 3}, {"bits": 16}, {"bits": 4, "quant_type": "int8"}, {"bits": 4, "quant_type": "nf3"},
    {"bits": 8, "quant_type": "nf4"}, {"bits": 8, "quant_type": "int8", "double_quant": True},
    {"bits": 4, "quant_type": "nf4", "blocksize": 48},
])
def test_bad_spec_is_a_usage_error(kwargs: dict) -> None:
    with pytest.raises(UsageError):
        QuantSpec(**kwargs)


def test_policy_quantizes_projections_and_experts_only() -> None:
    spec = SPECS["nf4"]
    yes = [
        "model.layers.0.self_attn.q_proj.weight", "model.layers.12.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight",
        "model.layers.3.mlp.experts.7.up_proj.weight", "model.layers.27.mlp.experts.63.down_proj.weight",
        "model.layers.3.mlp.shared_experts.gate_proj.weight",
    ]
    no = [
        "model.embed_tokens.weight", "model.norm.weight", "model.layers.3.input_layernorm.weight",
        "model.layers.3.post_attention_layernorm.weight", "model.layers.3.mlp.gate.weight", "lm_head.weight",
        "model.layers.3.mlp.experts.7.up_proj.SCB", "model.layers.3.self_attn.rotary_emb.inv_freq",
    ]
    assert all(should_quantize(n, spec) for n in yes)
    assert not any(should_quantize(n, spec) for n in no)
    with_head = QuantSpec(bits=4, quant_type="nf4", quantize_lm_head=True)
    assert should_quantize("lm_head.weight", with_head)
    assert spec_for("lm_head.weight", with_head).bits == 8  # lm_head goes to 8-bit, not 4-bit
    assert spec_for("model.layers.1.mlp.experts.0.up_proj.weight", with_head) == with_head


@pytest.mark.parametrize("name", list(SPECS))
def test_quantization_config_round_trip(name: str) -> None:
    spec = SPECS[name]
    config = quantization_config(spec)
    assert config["quant_method"] == "bitsandbytes"
    assert config["load_in_4bit"] == (spec.bits == 4) and config["load_in_8bit"] == (spec.bits == 8)
    assert config["llm_int8_skip_modules"] == ["lm_head"]
    assert spec_from_config(config) == spec
    head = QuantSpec(bits=spec.bits, quant_type=spec.quant_type, double_quant=spec.double_quant, quantize_lm_head=True)
    assert spec_from_config(quantization_config(head)) == head


def test_transformers_config_is_read() -> None:
    # What transformers' BitsAndBytesConfig.to_dict() writes for a default 4-bit nf4 load.
    config = {
        "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
        "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "load_in_4bit": True,
        "load_in_8bit": False, "quant_method": "bitsandbytes",
    }
    assert spec_from_config(config) == QuantSpec(bits=4, quant_type="nf4", double_quant=True)


@pytest.mark.parametrize("config", [
    {"quant_method": "gptq", "bits": 4},
    {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": True},
    {"quant_method": "bitsandbytes", "load_in_4bit": False, "load_in_8bit": False},
    {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "int4"},
    {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_storage": "bfloat16"},
    {"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_has_fp16_weight": True},
])
def test_unsupported_config_is_a_checkpoint_error(config: dict) -> None:
    with pytest.raises(CheckpointError):
        spec_from_config(config)


# ---- numbers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SPECS))
def test_weights_equal_bitsandbytes_dequantization(name: str) -> None:
    spec = SPECS[name]
    weight = _weight()
    module = quantize_linear(weight, spec, torch.float32)
    assert torch.allclose(module.dequantized(), _bnb_reference(weight, spec), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("width", [32, 96])
def test_rows_narrower_than_a_block(width: int) -> None:
    """Blocks spanning two rows (DeepSeekMoE-tiny's 32-wide down_proj) follow bitsandbytes' reference."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    weight = torch.randn(64, width, generator=torch.Generator().manual_seed(3))
    for spec in (SPECS["nf4"], SPECS["fp4-dq"]):
        module = quantize_linear(weight, spec, torch.float32)
        packed, state = BF.quantize_4bit(weight, blocksize=64, compress_statistics=spec.double_quant,
                                         quant_type=spec.quant_type)
        absmax = BF.dequantize_blockwise(state.absmax, state.state2) + state.offset if spec.double_quant else state.absmax
        expected = _dequantize_4bit_compute(packed.reshape(-1), absmax, state.code, 64, (64, width), torch.float32)
        assert torch.allclose(module.dequantized(), expected, rtol=1e-6, atol=1e-7)
        assert _rel(module.dequantized(), weight) < 0.2  # NF4/FP4 on Gaussian weights: about 0.1


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("rows", [1, 40])
def test_fp32_forward_is_exact_dequant_matmul(name: str, rows: int) -> None:
    spec = SPECS[name]
    weight = _weight()
    module = quantize_linear(weight, spec, torch.float32)
    x = _inputs(rows)
    expected = x @ _bnb_reference(weight, spec).t()
    assert _rel(module(x), expected) < 1e-5


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("rows", [1, 40])
def test_bf16_forward_matches_dequant_matmul(name: str, rows: int) -> None:
    spec = SPECS[name]
    weight = _weight()
    module = quantize_linear(weight, spec, torch.bfloat16)
    x = _inputs(rows).to(torch.bfloat16).reshape(rows, 1, IN)
    out = module(x)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 1, OUT)
    expected = x.float() @ _bnb_reference(weight, spec).t()
    # bf16 keeps 8 mantissa bits: a few 1e-3 relative error; a wrong codebook or scale is > 5e-2.
    # The native decode kernels also round the activations to int8 (~0.6%), the 4-bit one the codebook.
    native = module.kernel(rows) in ("4bit_native", "int8_native")
    assert _rel(out, expected) < (2e-2 if native else 1e-2)


def test_wrong_codebook_would_fail_the_tolerance() -> None:
    """The bf16 tolerance above is tight enough to tell NF4 from FP4 or a unit absmax."""
    weight = _weight()
    nf4 = _bnb_reference(weight, SPECS["nf4"])
    fp4 = _bnb_reference(weight, SPECS["fp4"])
    x = _inputs(8)
    assert _rel(x @ fp4.t(), x @ nf4.t()) > 5e-2


def test_module_attributes_and_no_bias() -> None:
    for spec in SPECS.values():
        module = quantize_linear(_weight(), spec)
        assert (module.in_features, module.out_features) == (IN, OUT)
        assert not any(n.endswith("bias") for n, _ in module.named_buffers())


def test_dtype_cast_keeps_the_format() -> None:
    """model.half() must not round absmax or SCB: the numbers would silently change."""
    for spec in (SPECS["nf4"], SPECS["int8"]):
        module = quantize_linear(_weight(), spec, torch.float32)
        x = _inputs(3)
        before = module(x)
        module.to(torch.float16)
        assert torch.equal(module(x), before)


# ---- kernel choice ---------------------------------------------------------------------------


def test_cpu_layouts_equal_bitsandbytes_repack_and_invert() -> None:
    import copy

    packed, state = BF.quantize_4bit(_weight(dtype=torch.float32), blocksize=64, quant_type="nf4")
    theirs, _ = BF._convert_weight_packed_for_cpu(packed.clone(), copy.deepcopy(state))
    ours = kernels.pack_4bit(packed, "cpu", OUT, IN)
    assert torch.equal(ours, theirs)
    native = kernels.pack_4bit(packed, "native", OUT, IN)
    # The native layout: bitsandbytes' with each row pair's four consecutive columns in one word.
    pairs = theirs.view(OUT // 32, IN // 4, 2, 16, 2)  # [tile, q, j % 2, r, c]
    assert torch.equal(native, pairs.permute(0, 1, 3, 2, 4).reshape(OUT, IN // 2))
    for layout, weight in (("cpu", ours), ("native", native)):
        assert torch.equal(kernels.unpack_4bit(weight, layout, OUT, IN), packed)


def test_kernel_choice() -> None:
    nf4_bf16 = quantize_linear(_weight(), SPECS["nf4"], torch.bfloat16)
    # dsmoe's kernel where its library is built (AVX512-VNNI or AVX2), else bitsandbytes' (AVX512-BF16)
    if kernels.native_4bit_available():
        layout, cpu_kernel = "native", "4bit_native"
    elif kernels.cpu_4bit_kernel_available():
        layout, cpu_kernel = "cpu", "bnb_cpu_4bit"
    else:
        layout, cpu_kernel = "standard", "dequant_matmul"
    assert nf4_bf16.kernel(1) == nf4_bf16.kernel(64) == cpu_kernel
    assert nf4_bf16.layout == layout
    assert quantize_linear(_weight(), SPECS["nf4"], torch.float32).kernel(1) == "dequant_matmul"
    # 40 rows: not a multiple of the CPU tile, so the standard layout and dequantize + matmul.
    odd = quantize_linear(torch.randn(40, IN), SPECS["nf4"], torch.bfloat16)
    assert odd.layout == "standard" and odd.kernel(1) == "dequant_matmul"
    int8 = quantize_linear(_weight(), SPECS["int8"], torch.bfloat16)
    decode = "int8_native" if native_library() is not None else "int8pack"
    assert int8.kernel(1) == int8.kernel(kernels.INT_MM_MIN_ROWS - 1) == decode
    # prefill: _int_mm where it was measured faster (VNNI), dsmoe's kernel on AVX2 (23x _int_mm there)
    prefill = "int8_native" if native_kernels_in_use() == "AVX2" else "int_mm_dynamic"
    assert int8.kernel(64) == int8.kernel(4096) == prefill


# ---- files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SPECS))
def test_safetensors_round_trip_is_identical(name: str, tmp_path) -> None:
    spec = SPECS[name]
    prefix = "model.layers.0.self_attn.q_proj"
    for compute in (torch.bfloat16, torch.float32):
        module = quantize_linear(_weight(), spec, compute)
        tensors = quantized_tensors(module, prefix)
        assert all(k.startswith(prefix + ".") and v.device.type == "cpu" for k, v in tensors.items())
        save_file(tensors, str(tmp_path / "q.safetensors"))
        loaded = linear_from_tensors(load_file(str(tmp_path / "q.safetensors")), prefix, spec, compute)
        x = _inputs(5).to(compute)
        assert torch.equal(loaded(x), module(x))
        assert all(torch.equal(v, quantized_tensors(loaded, prefix)[k]) for k, v in tensors.items())


def test_4bit_layout_names() -> None:
    tensors = quantized_tensors(quantize_linear(_weight(), SPECS["fp4-dq"]), "p")
    assert set(tensors) == {"p.weight", "p.weight.absmax", "p.weight.quant_map", "p.weight.nested_absmax",
                            "p.weight.nested_quant_map", "p.weight.quant_state.bitsandbytes__fp4"}
    assert tensors["p.weight"].dtype == torch.uint8 and tensors["p.weight"].shape == (OUT * IN // 2, 1)
    state = BF.unpack_tensor_to_dict(tensors["p.weight.quant_state.bitsandbytes__fp4"])
    assert state["quant_type"] == "fp4" and state["blocksize"] == 64 and state["shape"] == [OUT, IN]
    assert state["nested_blocksize"] == 256
    int8 = quantized_tensors(quantize_linear(_weight(), SPECS["int8"]), "p")
    assert set(int8) == {"p.weight", "p.SCB", "p.weight_format"} and int8["p.weight"].dtype == torch.int8


@pytest.mark.parametrize("name", list(SPECS))
def test_reads_what_bitsandbytes_modules_save(name: str) -> None:
    """state_dict() of bitsandbytes' own Linear4bit / Linear8bitLt is what transformers writes."""
    spec = SPECS[name]
    weight = _weight(dtype=torch.float32)
    if spec.bits == 4:
        theirs = bnb.nn.Linear4bit(IN, OUT, bias=False, quant_type=spec.quant_type,
                                   compress_statistics=spec.double_quant, compute_dtype=torch.float32)
        theirs.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type=spec.quant_type,
                                          compress_statistics=spec.double_quant)
    else:
        theirs = bnb.nn.Linear8bitLt(IN, OUT, bias=False, has_fp16_weights=False)
        theirs.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    theirs = theirs.to("cpu")
    state = {f"layer.{k}": v for k, v in theirs.state_dict().items()}
    ours = linear_from_tensors(state, "layer", spec, torch.float32)
    x = _inputs(4)
    if spec.bits == 4:
        expected = x @ BF.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state).float().t()
    else:
        expected = x @ BF.int8_vectorwise_dequant(theirs.weight.data, theirs.weight.SCB).t()
    assert _rel(ours(x), expected) < 1e-5
    assert {k: v.dtype for k, v in quantized_tensors(ours, "layer").items()} == {k: v.dtype for k, v in state.items()}


@pytest.mark.parametrize("name", ["nf4", "fp4-dq"])
def test_reads_functional_4bit_layout(name: str) -> None:
    spec = SPECS[name]
    weight = _weight()
    packed, state = BF.quantize_4bit(weight, blocksize=64, compress_statistics=spec.double_quant,
                                     quant_type=spec.quant_type)
    tensors = {"w.weight": packed, **{f"w.weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    module = linear_from_tensors(tensors, "w", spec, torch.float32)
    x = _inputs(3)
    state.dtype = torch.float32
    assert _rel(module(x), x @ BF.dequantize_4bit(packed, state).t()) < 1e-5


def test_broken_tensors_are_checkpoint_errors() -> None:
    tensors = quantized_tensors(quantize_linear(_weight(), SPECS["nf4"]), "p")
    spec = SPECS["nf4"]
    with pytest.raises(CheckpointError):
        linear_from_tensors({k: v for k, v in tensors.items() if "quant_state" not in k}, "p", spec, torch.float32)
    with pytest.raises(CheckpointError):
        linear_from_tensors({**tensors, "p.weight.quant_map": tensors["p.weight.quant_map"] * 2}, "p", spec,
                            torch.float32)
    with pytest.raises(CheckpointError):
        linear_from_tensors({**tensors, "p.weight": tensors["p.weight"][:-8]}, "p", spec, torch.float32)
    with pytest.raises(CheckpointError):
        linear_from_tensors({**tensors, "p.weight.absmax": tensors["p.weight.absmax"][:-1]}, "p", spec,
                            torch.float32)
    with pytest.raises(CheckpointError):
        linear_from_tensors({}, "p", spec, torch.float32)
    int8 = quantized_tensors(quantize_linear(_weight(), SPECS["int8"]), "p")
    with pytest.raises(CheckpointError):
        linear_from_tensors({**int8, "p.weight_format": torch.tensor(2, dtype=torch.uint8)}, "p", SPECS["int8"],
                            torch.float32)
    with pytest.raises(CheckpointError):
        linear_from_tensors({**int8, "p.SCB": int8["p.SCB"][:-1]}, "p", SPECS["int8"], torch.float32)
    with pytest.raises(CheckpointError):  # 8-bit declared, 4-bit stored
        linear_from_tensors(tensors, "p", SPECS["int8"], torch.float32)


def test_quantize_model_replaces_policy_linears() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(IN, OUT, bias=False)

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Module()
            self.model.layers = nn.ModuleList([nn.Module()])
            self.model.layers[0].self_attn = Block()
            self.lm_head = nn.Linear(IN, OUT, bias=False)

    tiny = Tiny()
    assert quantize_model(tiny, SPECS["nf4"]) == 1
    assert isinstance(tiny.model.layers[0].self_attn.q_proj, Linear4bit)
    assert isinstance(tiny.lm_head, nn.Linear)
    tiny = Tiny()
    assert quantize_model(tiny, QuantSpec(bits=4, quant_type="nf4", quantize_lm_head=True)) == 2
    assert isinstance(tiny.lm_head, Linear8bit)


def test_int8_kernel_choice_by_rows_and_its_error() -> None:
    """Prefill-sized batches round activations per row (LLM.int8-style), decode per block of 64 (native)."""
    weight = _weight(5, torch.float32)
    fast = quantize_linear(weight, SPECS["int8"], torch.bfloat16)
    exact = quantize_linear(weight, SPECS["int8"], torch.float32)
    assert fast.kernel(kernels.INT_MM_MIN_ROWS) == ("int8_native" if native_kernels_in_use() == "AVX2"
                                                    else "int_mm_dynamic")
    assert exact.kernel(64) == "int8pack"  # quality runs keep the weight-only numbers
    gen = torch.Generator().manual_seed(6)
    for rows in (1, kernels.INT_MM_MIN_ROWS, 64):
        x = torch.randn(rows, IN, generator=gen)
        reference = x @ fast.dequantized().t()
        error = ((fast(x.bfloat16()).float() - reference).norm() / reference.norm()).item()
        # bf16 rounding alone is ~0.3%; int8 activations add up to ~1%; a wrong scale is far off.
        assert error < (0.006 if fast.kernel(rows) == "int8pack" else 0.015), (rows, error)


def test_dynamic_int8_matmul_rounds_each_row_of_activations() -> None:
    """``int8_dynamic_mm`` (prefill on VNNI, and without dsmoe's library) is exact integer sums over
    activations rounded per row to 127 / row absmax, whichever kernel the layers pick here."""
    layer = quantize_linear(_weight(7, torch.float32), SPECS["int8"], torch.bfloat16)
    assert isinstance(layer, Linear8bit)
    for rows in (3, 40):  # under and over _int_mm's 17-row minimum
        x = torch.randn(rows, IN, generator=torch.Generator().manual_seed(rows)).bfloat16()
        row_max = x.float().abs().amax(dim=1, keepdim=True)
        xq = torch.round(x.double() * 127 / row_max.double()) * row_max.double() / 127
        want = xq @ (layer.weight.double() * layer.SCB.double()[:, None] / 127).t()
        got = kernels.int8_dynamic_mm(x, layer.weight.t(), layer.scale).double()
        # bf16 output, and a float32 product that lands on .5 may round the other way: both ~2^-8
        torch.testing.assert_close(got, want, rtol=2**-7, atol=2**-8 * want.abs().max().item())
