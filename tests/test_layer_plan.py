"""The native two-call decode step of a layer gives the module path's bits, and steps aside when it must."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch

from dsmoe import load
from dsmoe.demo import DEMO_MODEL_PATH
from dsmoe.model import layer_plan
from dsmoe.model.layer_plan import LayerPlan
from dsmoe.model.deepseek import DecoderLayer, DeepseekForCausalLM, MoE
from dsmoe.native.library import native_library
from dsmoe.quant import QuantSpec, kernels, quantize_linear
from dsmoe.quant.spec import INT8


def _native_or_skip(bits: int) -> None:
    if native_library() is None:
        pytest.skip("the native library is not built (tests/test_native_kernels.py fails for that)")
    if bits == 4:
        assert kernels.native_4bit_available(), "the 4-bit kernels run wherever the 8-bit ones do"


@pytest.fixture(scope="module", params=[4, 8], ids=["4bit", "8bit"])
def model(request) -> DeepseekForCausalLM:  # type: ignore[no-untyped-def]
    _native_or_skip(request.param)
    loaded, _ = load(DEMO_MODEL_PATH, bits=request.param)
    return loaded


def _plan_of(layer: DecoderLayer) -> LayerPlan | None:
    """The layer's decode plan for a bf16 token (the probe's shape and dtype are all that matter)."""
    return layer.decode_plan(torch.zeros(1, 1, 1, dtype=torch.bfloat16))


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
            assert _plan_of(layer) is not None
            x, cos, sin = _step_inputs(model, pos, seed=i)
            got = layer(x, cos, sin, pos, planned, _plan_of(layer))
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
    plan = _plan_of(layer)
    assert plan is not None and plan is not old_plan
    with torch.inference_mode():
        planned, moduled = model.new_cache(1, 4), model.new_cache(1, 4)
        x, cos, sin = _step_inputs(model, 0, seed=seed)
        assert torch.equal(layer(x, cos, sin, 0, planned, plan), _module_path(layer, x, cos, sin, 0, moduled))


def test_a_replaced_weight_makes_a_new_plan(model: DeepseekForCausalLM) -> None:
    layer = model.model.layers[1]
    first = _plan_of(layer)
    assert first is not None and _plan_of(layer) is first
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
    first = _plan_of(layer)
    norm = layer.post_attention_layernorm
    old = norm.weight.data
    norm.weight.data = old.clone() * 2
    try:
        _assert_new_plan_gives_module_bits(model, layer, first, seed=6)
    finally:
        norm.weight.data = old


def test_hooks_and_unquantized_layers_take_the_module_path(model: DeepseekForCausalLM) -> None:
    layer = model.model.layers[1]
    handle = layer.mlp.register_forward_hook(lambda module, args, out: None)
    try:
        assert _plan_of(layer) is None
    finally:
        handle.remove()
    assert _plan_of(layer) is not None
    bf16, _ = load(DEMO_MODEL_PATH, dtype=torch.bfloat16)
    assert _plan_of(bf16.model.layers[1]) is None


def _decode_logits(model: DeepseekForCausalLM, native: bool, steps: int = 3) -> torch.Tensor:
    """Logits of a few decode steps after a fixed prompt, by the native stack or by the modules."""
    prompt = torch.randint(0, 2048, (1, 6), generator=torch.Generator().manual_seed(3))
    off = mock.patch.object(DecoderLayer, "decode_plan", lambda self, x: None)
    with torch.inference_mode(), (contextlib.nullcontext() if native else off):
        cache = model.new_cache(1, 16)
        logits = [model(prompt, cache=cache, last_only=True)]
        for _ in range(steps):
            logits.append(model(logits[-1].argmax(-1), cache=cache, last_only=True))
    return torch.cat(logits, dim=1)


def test_a_decode_step_is_one_native_call_on_the_same_plan(model: DeepseekForCausalLM) -> None:
    lib = native_library()
    real = lib.dsmoe_decode_layers
    calls: list[int] = []
    with mock.patch.object(lib, "dsmoe_decode_layers", lambda *a: calls.append(a[1]) or real(*a)):
        _decode_logits(model, native=True, steps=1)
        stack = model.model._stack
        with mock.patch.object(layer_plan.LayerPlan, "for_layer", side_effect=AssertionError("rebuilt")):
            _decode_logits(model, native=True, steps=4)
    assert model.model._stack is stack
    assert calls == [len(model.model.layers)] * 5  # one per decode step, none for the prompts


def test_replaced_experts_make_a_new_plan(model: DeepseekForCausalLM) -> None:
    moe = model.model.layers[1].mlp
    first = _plan_of(model.model.layers[1])
    old = [expert.down_proj for expert in moe.experts]
    spec = QuantSpec(bits=4) if old[0].__class__.__name__ == "Linear4bit" else INT8
    before = _decode_logits(model, native=True)
    for expert, down in zip(moe.experts, old):
        expert.down_proj = quantize_linear(down.dequantized() * -1.5, spec, torch.bfloat16)
    try:
        after = _decode_logits(model, native=True)
        assert model.model.layers[1]._plan is not first and first.storages == []  # the old one let go
        assert torch.equal(after, _decode_logits(model, native=False)) and not torch.equal(after, before)
    finally:
        for expert, down in zip(moe.experts, old):
            expert.down_proj = down


def test_experts_changed_in_place_are_read_by_the_same_plan(model: DeepseekForCausalLM) -> None:
    """The kernels read the weights where they are: an in-place change needs no new plan."""
    before = _decode_logits(model, native=True)
    stack = model.model._stack
    weights = [expert.up_proj.weight for expert in model.model.layers[1].mlp.experts]
    saved = [w.clone() for w in weights]
    for w in weights:
        w.copy_(w.flip(0))
    try:
        after = _decode_logits(model, native=True)
        assert model.model._stack is stack
        assert torch.equal(after, _decode_logits(model, native=False)) and not torch.equal(after, before)
    finally:
        for w, s in zip(weights, saved):
            w.copy_(s)


def test_a_hook_on_a_layer_takes_the_layer_by_layer_path(model: DeepseekForCausalLM) -> None:
    seen: list[int] = []
    handle = model.model.layers[0].register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    try:
        hooked = _decode_logits(model, native=True)
    finally:
        handle.remove()
    assert seen == [6, 1, 1, 1]
    assert torch.equal(hooked, _decode_logits(model, native=True))
    called: list[str] = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: called.append(type(module).__name__))
    try:
        assert torch.equal(_decode_logits(model, native=True), hooked)
    finally:
        handle.remove()
    assert called.count("DecoderLayer") == 4 * len(model.model.layers)  # a global hook sees every step


def test_an_expert_holder_takes_over_from_the_plan(model: DeepseekForCausalLM) -> None:
    _decode_logits(model, native=True)
    moe = model.model.layers[1].mlp
    ran: list[int] = []

    class Holder:
        def routed(self, layer: int, x: torch.Tensor, ids: torch.Tensor) -> None:
            pass

        def run(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
            if layer == moe.layer_idx:
                ran.append(layer)
            return model.model.layers[layer].mlp.experts[expert](x)

    model.experts_channel.hold(Holder())
    try:
        assert torch.equal(_decode_logits(model, native=True), _decode_logits(model, native=False))
        with torch.inference_mode():
            cache = model.new_cache(1, 8)
            model(torch.tensor([[5, 6]]), cache=cache)
            ran.clear()
            model(torch.tensor([[7]]), cache=cache)  # a decode step
    finally:
        model.experts_channel.hold(None)
    assert len(ran) == moe.gate.top_k
