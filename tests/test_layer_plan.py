"""The native two-call decode step of a layer gives the module path's bits, and steps aside when it must."""

from __future__ import annotations

import pytest
import torch

from dsmoe import load
from dsmoe.demo import DEMO_MODEL_PATH
from dsmoe.model.deepseek import DecoderLayer, DeepseekForCausalLM, MoE
from dsmoe.quant import QuantSpec, kernels, quantize_linear
from dsmoe.quant.spec import INT8


def _native_or_skip(bits: int) -> None:
    if kernels.native_library() is None:
        pytest.skip("the native library is not built (tests/test_native_kernels.py fails for that)")
    if bits == 4 and not kernels.native_4bit_available():
        pytest.skip("the native 4-bit kernels need AVX512-BF16 and VNNI")


@pytest.fixture(scope="module", params=[4, 8], ids=["4bit", "8bit"])
def model(request) -> DeepseekForCausalLM:  # type: ignore[no-untyped-def]
    _native_or_skip(request.param)
    loaded, _ = load(DEMO_MODEL_PATH, bits=request.param)
    return loaded


def _module_path(layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int, cache) -> torch.Tensor:  # type: ignore[no-untyped-def]
    x = x + layer.self_attn(layer.input_layernorm(x), cos, sin, pos, cache)
    return x + layer.mlp(layer.post_attention_layernorm(x))


def _step_inputs(model: DeepseekForCausalLM, pos: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(1, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(seed)).bfloat16()
    cos, sin = model.model.rotary(torch.tensor([pos]), pos + 1, torch.bfloat16)
    return x, cos, sin


def test_each_layer_gives_the_module_paths_bits(model: DeepseekForCausalLM) -> None:
    prompt = torch.randint(0, 2048, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        planned, moduled = model.new_cache(1, 16), model.new_cache(1, 16)
        model(prompt, cache=planned), model(prompt, cache=moduled)
        pos = planned.length
        for i, layer in enumerate(model.model.layers):
            assert layer.decode_plan(torch.zeros(1, 1, 1, dtype=torch.bfloat16)) is not None
            x, cos, sin = _step_inputs(model, pos, seed=i)
            got = layer(x, cos, sin, pos, planned)
            want = _module_path(layer, x, cos, sin, pos, moduled)
            assert torch.equal(got, want), f"layer {i}"
            assert torch.equal(planned.keys[i], moduled.keys[i]) and torch.equal(planned.values[i], moduled.values[i])
    assert any(isinstance(layer.mlp, MoE) for layer in model.model.layers)
    assert any(not isinstance(layer.mlp, MoE) for layer in model.model.layers)  # a dense layer too


def test_generation_and_routing_are_the_module_paths(model: DeepseekForCausalLM, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    prompt = torch.randint(0, 2048, (1, 9), generator=torch.Generator().manual_seed(2))
    seen: dict[str, list[tuple[int, list[int], list[float]]]] = {"plan": [], "modules": []}

    def run(label: str) -> torch.Tensor:
        model.set_routing_observer(lambda i, ids, w: seen[label].append((i, ids.tolist(), w.tolist())))
        try:
            with torch.inference_mode():
                return model.generate(prompt, max_new_tokens=8)
        finally:
            model.set_routing_observer(None)

    planned = run("plan")
    monkeypatch.setattr(DecoderLayer, "decode_plan", lambda self, x: None)
    assert torch.equal(run("modules"), planned)
    assert seen["plan"] == seen["modules"] and len(seen["plan"]) > 0


def _assert_new_plan_gives_module_bits(model: DeepseekForCausalLM, layer: DecoderLayer, old_plan: object,
                                       seed: int) -> None:
    """After a weight change: the layer has rebuilt its plan, and the plan gives the module path's bits."""
    plan = layer.decode_plan(torch.zeros(1, 1, 1, dtype=torch.bfloat16))
    assert plan is not None and plan is not old_plan
    with torch.inference_mode():
        planned, moduled = model.new_cache(1, 4), model.new_cache(1, 4)
        x, cos, sin = _step_inputs(model, 0, seed=seed)
        assert torch.equal(layer(x, cos, sin, 0, planned), _module_path(layer, x, cos, sin, 0, moduled))


def test_a_replaced_weight_makes_a_new_plan(model: DeepseekForCausalLM) -> None:
    layer = model.model.layers[1]
    probe = torch.zeros(1, 1, 1, dtype=torch.bfloat16)
    first = layer.decode_plan(probe)
    assert first is not None and layer.decode_plan(probe) is first
    old = layer.self_attn.o_proj
    spec = QuantSpec(bits=4) if old.__class__.__name__ == "Linear4bit" else INT8
    layer.self_attn.o_proj = quantize_linear(old.dequantized() * 0.5, spec, torch.bfloat16)
    try:
        _assert_new_plan_gives_module_bits(model, layer, first, seed=5)
    finally:
        layer.self_attn.o_proj = old


def test_a_norm_given_new_storage_makes_a_new_plan(model: DeepseekForCausalLM) -> None:
    """``param.data = ...`` keeps the Parameter but frees the storage the plan pointed at."""
    layer = model.model.layers[2]
    probe = torch.zeros(1, 1, 1, dtype=torch.bfloat16)
    first = layer.decode_plan(probe)
    norm = layer.post_attention_layernorm
    old = norm.weight.data
    norm.weight.data = old.clone() * 2
    try:
        _assert_new_plan_gives_module_bits(model, layer, first, seed=6)
    finally:
        norm.weight.data = old


def test_hooks_and_unquantized_layers_take_the_module_path(model: DeepseekForCausalLM) -> None:
    layer = model.model.layers[1]
    probe = torch.zeros(1, 1, 1, dtype=torch.bfloat16)
    handle = layer.mlp.register_forward_hook(lambda module, args, out: None)
    try:
        assert layer.decode_plan(probe) is None
    finally:
        handle.remove()
    assert layer.decode_plan(probe) is not None
    bf16, _ = load(DEMO_MODEL_PATH, dtype=torch.bfloat16)
    assert bf16.model.layers[1].decode_plan(probe) is None
