"""The decode step's shortcuts give the general path's numbers: attention, routing, 4-bit kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsmoe import load
from dsmoe.model.deepseek import MoE, _one_query_attention
from dsmoe.quant import QuantSpec, kernels, quantize_linear


@pytest.mark.parametrize("n_heads,n_kv", [(8, 8), (8, 2)])
def test_one_query_attention_matches_sdpa(n_heads: int, n_kv: int) -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, n_heads, 1, 64, generator=gen)
    k = torch.randn(2, n_kv, 37, 64, generator=gen)
    v = torch.randn(2, n_kv, 37, 64, generator=gen)
    expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=n_kv != n_heads)
    torch.testing.assert_close(_one_query_attention(q, k, v), expected, rtol=1e-5, atol=1e-5)


def test_single_token_routing_gives_the_grouped_routes_bits(tiny_path) -> None:
    model, _ = load(tiny_path, dtype=torch.bfloat16)
    moe: MoE = model.moe_layers()[0]
    x = torch.randn(1, model.config.hidden_size, generator=torch.Generator().manual_seed(1)).bfloat16()
    ids, weights = moe.gate(x)
    with torch.inference_mode():
        one = moe.route(x, ids, weights)  # the single-token path
        # Two copies of the token take the grouped path; each row must come out the same.
        grouped = moe.route(x.repeat(2, 1), ids.repeat(2, 1), weights.repeat(2, 1))
    assert torch.equal(one[0], grouped[0]) and torch.equal(one[0], grouped[1])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_direct_4bit_kernel_equals_the_bitsandbytes_op(quant_type: str) -> None:
    if not kernels.cpu_4bit_kernel_available():
        pytest.skip("bitsandbytes' CPU 4-bit kernel needs AVX512-BF16")
    weight = torch.randn(96, 128, generator=torch.Generator().manual_seed(2)) * 0.02
    layer = quantize_linear(weight, QuantSpec(bits=4, quant_type=quant_type), torch.bfloat16)
    entry = kernels.cpu_4bit_entry(quant_type)  # what runs where dsmoe's native kernels are not built
    assert entry is not None
    # bitsandbytes' layouts, whichever the layer holds for dsmoe's kernel
    weight = kernels.pack_4bit(kernels.unpack_4bit(layer.weight, layer.layout, 96, 128), "cpu", 96, 128)
    absmax_t = layer._absmax_f32().view(96, -1).t().to(torch.bfloat16).contiguous()
    x = torch.randn(3, 128).bfloat16()
    args = (weight, (96, 128), absmax_t, layer.quant_map, layer.blocksize)
    via_op = kernels.gemv_4bit_cpu(x, *args)
    for rows in (x[:1], x):
        assert torch.equal(kernels.gemv_4bit_cpu(rows, *args, entry=entry), via_op[: rows.shape[0]])
