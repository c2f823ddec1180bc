"""The runtime against the reference implementation's outputs on the tiny fixture."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dsmoe import load


@pytest.fixture(scope="module")
def reference(tiny_path):
    return load_file(str(tiny_path / "reference.safetensors"))


@pytest.fixture(scope="module")
def fp32_model(tiny_path):
    model, tokenizer = load(tiny_path, dtype=torch.float32)
    return model, tokenizer


def test_logits_match_reference(fp32_model, reference):
    model, _ = fp32_model
    with torch.inference_mode():
        logits = model(reference["input_ids"])
    assert logits.shape == reference["logits"].shape
    assert (logits - reference["logits"]).abs().max().item() < 1e-4


def test_router_choices_match_reference(fp32_model, reference):
    model, _ = fp32_model
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    model.set_routing_observer(lambda layer, ids, weights: seen.__setitem__(layer, (ids, weights)))
    try:
        with torch.inference_mode():
            model(reference["input_ids"])
    finally:
        model.set_routing_observer(None)
    assert sorted(seen) == [1, 2]
    for layer, (ids, weights) in seen.items():
        assert torch.equal(ids, reference[f"router.{layer}.experts"])
        torch.testing.assert_close(weights, reference[f"router.{layer}.weights"], atol=1e-5, rtol=1e-5)


def test_greedy_generation_with_cache_matches_reference(fp32_model, reference):
    model, _ = fp32_model
    out = model.generate(reference["prompt_ids"], max_new_tokens=20, temperature=0.0)
    assert torch.equal(out, reference["greedy_ids"])


def test_bf16_model_agrees_with_fp32_on_top_tokens(tiny_path, reference):
    model, _ = load(tiny_path)  # bf16 is the default compute dtype
    assert model.dtype == torch.bfloat16
    with torch.inference_mode():
        logits = model(reference["input_ids"])
    agree = (logits.argmax(-1) == reference["logits"].argmax(-1)).float().mean().item()
    assert agree > 0.9
    rel = (logits - reference["logits"]).norm() / reference["logits"].norm()
    assert rel.item() < 0.05
