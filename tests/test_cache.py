"""KV-cached decoding equals the no-cache forward pass, across the config variants."""

from __future__ import annotations

import pytest
import torch

from dsmoe.checkpoint.config import DeepseekConfig
from dsmoe.model.deepseek import DeepseekForCausalLM

BASE = dict(
    model_type="deepseek", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, moe_intermediate_size=16,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
    moe_layer_freq=1, norm_topk_prob=False, rope_theta=10000.0,
)

VARIANTS = {
    "base": {},
    "gqa": {"num_key_value_heads": 2},
    "mqa": {"num_key_value_heads": 1},
    "norm_topk_prob": {"norm_topk_prob": True},
    "moe_layer_freq_2": {"moe_layer_freq": 2, "first_k_dense_replace": 0},
    "no_shared_experts": {"n_shared_experts": None},
    "rope_linear": {"rope_scaling": {"type": "linear", "factor": 2.0}},
    "rope_dynamic": {"rope_scaling": {"type": "dynamic", "factor": 2.0}},
    "attention_bias": {"attention_bias": True},
}


def random_model(**overrides: object) -> DeepseekForCausalLM:
    config = DeepseekConfig.from_dict({**BASE, **overrides})
    torch.manual_seed(0)
    model = DeepseekForCausalLM(config)
    for name, param in model.named_parameters():
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            torch.nn.init.normal_(param, 1.0, 0.1)
        else:
            torch.nn.init.normal_(param, 0.0, 0.2)
    return model.eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_decoding_equals_full_forward(variant):
    model = random_model(**VARIANTS[variant])
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model(ids)
        cache = model.new_cache(batch_size=2, capacity=4)  # small, so the cache must grow
        steps = [model(ids[:, :10], cache=cache)]  # a prefill chunk, then chunks and single tokens
        steps.append(model(ids[:, 10:13], cache=cache))
        steps.extend(model(ids[:, t : t + 1], cache=cache) for t in range(13, 24))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 24


def test_moe_layer_placement_follows_config():
    model = random_model(moe_layer_freq=2, first_k_dense_replace=1)
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == ["MLP", "MLP", "MoE", "MLP"]


def test_truncate_rolls_back_to_a_prefix():
    model = random_model()
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(2))
    other = torch.randint(0, 97, (1, 4), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        cache = model.new_cache()
        model(ids, cache=cache)
        cache.truncate(8)
        resumed = model(other, cache=cache)
        fresh = model(torch.cat([ids[:, :8], other], dim=1))[:, 8:]
    torch.testing.assert_close(resumed, fresh, atol=1e-5, rtol=1e-5)


def test_expanded_cache_serves_a_batch_of_continuations():
    model = random_model()
    context = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(4))
    continuations = torch.randint(0, 97, (3, 3), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        cache = model.new_cache()
        model(context, cache=cache)
        batched = model(continuations, cache=cache.expand(3))
        fresh = model(torch.cat([context.expand(3, -1), continuations], dim=1))[:, 9:]
    torch.testing.assert_close(batched, fresh, atol=1e-5, rtol=1e-5)
