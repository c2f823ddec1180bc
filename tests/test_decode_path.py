"""The decode step's shortcuts give the general path's numbers: attention, routing, 4-bit kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsmoe import load
from dsmoe.model.deepseek import MoE, _one_query_attention, apply_rotary
from dsmoe.quant import QuantSpec, kernels, quantize_linear


@pytest.mark.parametrize("n_heads,n_kv", [(8, 8), (8, 2)])
def test_one_query_attention_matches_sdpa(n_heads: int, n_kv: int) -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, n_heads, 1, 64, generator=gen)
    k = torch.randn(2, n_kv, 37, 64, generator=gen)
    v = torch.randn(2, n_kv, 37, 64, generator=gen)
    expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=n_kv != n_heads)
    torch.testing.assert_close(_one_query_attention(q, k, v), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (4, 2)])
def test_prompt_attention_from_position_0_gives_the_masked_bits(dtype: torch.dtype, n_heads: int, n_kv: int) -> None:
    """A prompt from position 0 runs SDPA as causal, which skips whole blocks above the diagonal;
    the numbers must be those of the explicit mask (a later chunk, whose keys include the cache, keeps it)."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, n_heads, 700, 64, generator=gen).to(dtype)
    k, v = (torch.randn(1, n_kv, 700, 64, generator=gen).to(dtype) for _ in range(2))
    positions = torch.arange(700)
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=positions[None, :] <= positions[:, None],
                                            enable_gqa=n_kv != n_heads)
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_kv != n_heads)
    assert torch.equal(causal, masked)


def test_prompt_attention_module_from_position_0_follows_the_mask(tiny_path) -> None:
    """The module's prompt path (no cache, position 0) against the projections, rotary and masked SDPA by hand."""
    model, _ = load(tiny_path, dtype=torch.bfloat16)
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 300, model.config.hidden_size, generator=torch.Generator().manual_seed(4)).bfloat16()
    cos, sin = model.model.rotary(torch.arange(300), 300, x.dtype)
    heads = [proj(x).view(1, 300, -1, attn.head_dim).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj)]
    q, k = (apply_rotary(t, cos, sin) for t in heads[:2])
    positions = torch.arange(300)
    want = F.scaled_dot_product_attention(q, k, heads[2], attn_mask=positions[None, :] <= positions[:, None],
                                          enable_gqa=attn.n_kv_heads != attn.n_heads)
    want = attn.o_proj(want.transpose(1, 2).reshape(1, 300, -1))
    with torch.inference_mode():
        assert torch.equal(attn(x, cos, sin, 0, None), want)


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
