"""dsmoe's C decode kernels: the int8 matmul, both instruction sets, and one-call SwiGLU MLPs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dsmoe import load
from dsmoe.demo import DEMO_MODEL_PATH
from dsmoe.checkpoint.config import DeepseekConfig
from dsmoe.model import deepseek
from dsmoe.model.deepseek import MLP, MoE
from dsmoe.model.routing import ExpertChannel
from dsmoe.native.library import (
    ACT_BLOCK,
    ISA_AVX2,
    ISA_VNNI,
    native_library,
    native_library_problem,
)
from dsmoe.native.ops import attention_decode, rms_norm_row
from dsmoe.offload import Budgets, OffloadOptions, load_offloaded
from dsmoe.quant import QuantSpec, kernels, quantize_linear
from dsmoe.quant.spec import INT8
from dsmoe.quant.linear import Linear4bit, Linear8bit, accumulate_experts, route_experts, swiglu_kernel


def _cpu_has_avx2() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return " avx2 " in flags.replace("\n", " ")


@pytest.fixture(scope="module")
def lib():
    """The library must be built wherever the CPU can run it: a silently missing build would hide here."""
    if not _cpu_has_avx2():
        pytest.skip("the native kernels need AVX2")
    library = native_library()
    assert library is not None, f"dsmoe's native library is not in use: {native_library_problem()}"
    return library


def _rounded_activations(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the kernel rounds it: int8 per block of 64 with scale absmax / 127."""
    blocks = x.float().view(x.shape[0], -1, ACT_BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    # 127 / amax as one fp32 division, as the C code does (`127 / tensor` multiplies by a reciprocal,
    # and a value landing on .5 then rounds the other way).
    inverse = torch.full_like(amax, 127.0) / amax
    q = torch.where(amax > 0, torch.round(blocks * inverse), torch.zeros_like(blocks)).clamp(-127, 127)
    return (q * (amax / 127)).view(x.shape)


def _int8_weight(out_features: int, in_features: int, seed: int) -> Linear8bit:
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.05
    weight[1, :5] *= 30  # an outlier row
    layer = quantize_linear(weight, INT8, torch.bfloat16)
    assert isinstance(layer, Linear8bit)
    return layer


@pytest.mark.parametrize("isa", [ISA_VNNI, ISA_AVX2], ids=["vnni", "avx2"])
@pytest.mark.parametrize("shape", [(37, 128), (96, 256), (2048, 64 * 11)], ids=str)
def test_int8_kernel_computes_the_rounded_product(lib, isa: int, shape: tuple[int, int]) -> None:
    """Each output is the exact sum over int8 activations and weights, for any row count and shape."""
    used = lib.dsmoe_native_use_isa(isa)
    try:
        if used != isa:
            pytest.skip("this CPU has no AVX512-VNNI")
        layer = _int8_weight(*shape, seed=shape[0])
        x = torch.randn(3, shape[1], generator=torch.Generator().manual_seed(1)).bfloat16()
        x[0, :3] *= 50  # one block with a large value, so block scales differ
        want = (_rounded_activations(x).double() @ layer.dequantized().double().t()).float()
        for rows in (1, 3):
            got = kernels.int8_native_mm(x[:rows], layer.weight, layer.scale, torch.float32)
            torch.testing.assert_close(got, want[:rows], rtol=1e-5, atol=1e-5 * want.abs().max().item())
            got_bf16 = kernels.int8_native_mm(x[:rows], layer.weight, layer.scale)
            torch.testing.assert_close(got_bf16, got.bfloat16(), rtol=0, atol=0)
    finally:
        lib.dsmoe_native_use_isa(-1)


def test_outputs_halfway_between_two_bf16_round_to_even(lib) -> None:
    """Outputs 257, 259, ..., 351 are exact in fp32 and halfway between two bf16 (8 significant
    bits): they round to the even neighbour, as PyTorch rounds them, in the kernels' vector
    conversion and its scalar tail (37 outputs: the int8 kernel stores runs of 16, 16 and 5)."""
    outputs = 48
    x = torch.zeros(2, 64)
    x[:, 0], x[:, 1] = 127, 1  # absmax 127: the int8 activations are x itself, with scale 1
    weight = torch.zeros(outputs, 64, dtype=torch.int8)
    weight[:, 0] = 2
    weight[:, 1] = 3 + 2 * torch.arange(outputs)  # 2 * 127 + 3 + 2n = 257 + 2n
    for count in (outputs, 37):
        for rows in (1, 2):
            got = kernels.int8_native_mm(x[:rows].bfloat16(), weight[:count], torch.ones(count))
            exact = (257 + 2 * torch.arange(count)).float().expand(rows, count)
            assert torch.equal(got, exact.bfloat16())
            assert not torch.equal(got, (exact + 0.5).bfloat16())  # rounding half up would give these


def test_both_instruction_sets_give_the_same_numbers(lib) -> None:
    if lib.dsmoe_native_use_isa(ISA_VNNI) != ISA_VNNI:
        pytest.skip("this CPU has no AVX512-VNNI")
    layer = _int8_weight(160, 512, seed=3)
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(4)).bfloat16()
    try:
        vnni = kernels.int8_native_mm(x, layer.weight, layer.scale, torch.float32)
        lib.dsmoe_native_use_isa(ISA_AVX2)
        avx2 = kernels.int8_native_mm(x, layer.weight, layer.scale, torch.float32)
    finally:
        lib.dsmoe_native_use_isa(-1)
    assert torch.equal(vnni, avx2)


def test_int8_layers_decode_with_the_native_kernel(lib) -> None:
    layer = _int8_weight(96, 256, seed=5)
    assert layer.kernel(1) == layer.kernel(kernels.INT_MM_MIN_ROWS - 1) == "int8_native"
    assert quantize_linear(torch.randn(96, 100), INT8, torch.bfloat16).kernel(1) == "int8pack"  # 100 % 64
    assert quantize_linear(torch.randn(96, 256), INT8, torch.float32).kernel(1) == "int8pack"
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(6))
    assert torch.equal(layer(x.bfloat16()), kernels.int8_native_mm(x.bfloat16(), layer.weight, layer.scale))
    exact = x @ layer.dequantized().t()
    error = ((layer(x.bfloat16()).float() - exact).norm() / exact.norm()).item()
    assert error < 0.015  # bf16 output (~0.3%) plus int8 activations; a wrong scale or sign is far off


def _mlp(spec: QuantSpec, hidden: int = 256, inter: int = 128, seed: int = 7) -> MLP:
    torch.manual_seed(seed)
    mlp = MLP(hidden, inter)
    for name in ("gate_proj", "up_proj", "down_proj"):
        dense = getattr(mlp, name)
        setattr(mlp, name, quantize_linear(dense.weight.detach() * 2, spec, torch.bfloat16))
    return mlp


def test_int8_mlp_in_one_call_matches_the_three_layers(lib) -> None:
    mlp = _mlp(INT8)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(8)).bfloat16()
    kernel = swiglu_kernel(mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    assert kernel is not None
    fused = kernel(x)
    assert fused.shape == x.shape
    layered = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))  # bf16 between the layers
    xf = x.float()
    exact = mlp.down_proj.dequantized() @ (F.silu(xf @ mlp.gate_proj.dequantized().t())
                                           * (xf @ mlp.up_proj.dequantized().t())).t()
    for got in (fused, layered):
        assert ((got.float() - exact.t()).norm() / exact.norm()).item() < 0.02
    assert ((fused.float() - layered.float()).norm() / layered.float().norm()).item() < 0.02
    assert torch.equal(mlp(x), fused)  # MLP.forward takes the one-call path for one token


@pytest.fixture(scope="module")
def lib4(lib):
    assert kernels.native_4bit_available(), "the 4-bit kernels run wherever the 8-bit ones do (VNNI or AVX2)"
    return lib


def _table_weight(layer: Linear4bit) -> torch.Tensor:
    """The weight the native kernel multiplies by: the codebook in the table's steps times the bf16 absmax."""
    out_features, in_features = layer.shape
    packed = kernels.unpack_4bit(layer.weight, layer.layout, out_features, in_features).reshape(-1)
    codes = torch.stack((packed >> 4, packed & 0xF), dim=-1).reshape(out_features, in_features).long()
    codebook = layer.native_codebook
    values = (codebook.table.long()[codes] - 128).double() * codebook.unit
    blocks = in_features // layer.blocksize
    tiles = layer.runtime_absmax.double().view(out_features // 32, blocks, 32)  # tile-major
    absmax = tiles.permute(0, 2, 1).reshape(out_features, blocks).repeat_interleave(layer.blocksize, dim=1)
    return values * absmax


@pytest.mark.parametrize("isa", [ISA_VNNI, ISA_AVX2], ids=["vnni", "avx2"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape,blocksize", [((32, 64), 64), ((96, 256), 64), ((64, 64 * 11), 64), ((64, 512), 128)],
                         ids=str)
def test_4bit_kernel_computes_the_rounded_product(lib4, isa: int, quant_type: str, shape: tuple[int, int],
                                                  blocksize: int) -> None:
    """Each output is the exact sum over int8 activations and the table's weights, then one bf16 rounding."""
    if lib4.dsmoe_native_use_isa(isa) != isa:
        lib4.dsmoe_native_use_isa(-1)
        pytest.skip("this CPU has no AVX512-VNNI")
    try:
        _check_4bit_kernel(quant_type, shape, blocksize)
    finally:
        lib4.dsmoe_native_use_isa(-1)


def _check_4bit_kernel(quant_type: str, shape: tuple[int, int], blocksize: int) -> None:
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1])) * 0.02
    weight[3, :7] *= 40  # an outlier block
    layer = quantize_linear(weight, QuantSpec(bits=4, quant_type=quant_type, blocksize=blocksize), torch.bfloat16)
    assert isinstance(layer, Linear4bit) and layer.kernel(1) == "4bit_native"
    x = torch.randn(5, shape[1], generator=torch.Generator().manual_seed(2)).bfloat16()
    x[0, :3] *= 50
    want = _rounded_activations(x).double() @ _table_weight(layer).t()
    for rows in (1, 5):  # one row (decode) and several (prefill) take different loops
        got = layer(x[:rows])
        assert torch.equal(got, kernels.native_4bit_mm(x[:rows], layer.weight, layer.shape, layer.runtime_absmax,
                                                       layer.native_codebook, layer.blocksize))
        torch.testing.assert_close(got.double(), want[:rows], rtol=2**-8, atol=1e-6 * want.abs().max().item())
        exact = x[:rows].double() @ layer.dequantized().double().t()
        # int8 activations (one block holds a 50x outlier), the table, bf16: ~1-2%; a wrong unit is ~13%.
        assert ((got.double() - exact).norm() / exact.norm()).item() < 0.03
    assert torch.equal(layer(x)[:1], layer(x[:1]))  # a row's result does not depend on the others


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_both_instruction_sets_give_the_same_4bit_numbers(lib4, quant_type: str) -> None:
    if lib4.dsmoe_native_use_isa(ISA_VNNI) != ISA_VNNI:
        lib4.dsmoe_native_use_isa(-1)
        pytest.skip("this CPU has no AVX512-VNNI")
    weight = torch.randn(96, 512, generator=torch.Generator().manual_seed(5)) * 0.02
    layer = quantize_linear(weight, QuantSpec(bits=4, quant_type=quant_type), torch.bfloat16)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(6)).bfloat16()
    try:
        vnni = [layer(x[:rows]) for rows in (1, 3)]
        lib4.dsmoe_native_use_isa(ISA_AVX2)
        avx2 = [layer(x[:rows]) for rows in (1, 3)]
    finally:
        lib4.dsmoe_native_use_isa(-1)
    assert all(torch.equal(a, b) for a, b in zip(vnni, avx2))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_rows_kernel_gives_each_row_its_one_row_bits(lib4, quant_type: str) -> None:
    """Prefill's kernel takes the rows in register groups with a short last group: at every row
    count each row must be what the one-row kernel gives it alone, on both instruction sets (the
    AVX2 kernel runs one row at a time), and the table's exact product to within bf16."""
    weight = torch.randn(96, 640, generator=torch.Generator().manual_seed(11)) * 0.02
    layer = quantize_linear(weight, QuantSpec(bits=4, quant_type=quant_type), torch.bfloat16)
    x = torch.randn(17, 640, generator=torch.Generator().manual_seed(12)).bfloat16()
    x[4, :3] *= 50
    alone = torch.cat([layer(x[i : i + 1]) for i in range(x.shape[0])])
    want = _rounded_activations(x).double() @ _table_weight(layer).t()
    torch.testing.assert_close(alone.double(), want, rtol=2**-8, atol=1e-6 * want.abs().max().item())
    isas = [ISA_VNNI, ISA_AVX2] if lib4.dsmoe_native_use_isa(ISA_VNNI) == ISA_VNNI else [ISA_AVX2]
    try:
        for isa in isas:
            lib4.dsmoe_native_use_isa(isa)
            for rows in [*range(1, 10), 17]:
                assert torch.equal(layer(x[:rows]), alone[:rows]), (isa, rows)
    finally:
        lib4.dsmoe_native_use_isa(-1)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_mlp_in_one_call_matches_the_three_layers(lib4, quant_type: str) -> None:
    mlp = _mlp(QuantSpec(bits=4, quant_type=quant_type))
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(9)).bfloat16()
    kernel = swiglu_kernel(mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    assert kernel is not None
    fused = kernel(x)
    layered = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))  # bf16 between the layers
    xf = x.float()
    exact = mlp.down_proj.dequantized() @ (F.silu(xf @ mlp.gate_proj.dequantized().t())
                                           * (xf @ mlp.up_proj.dequantized().t())).t()
    for got in (fused, layered):
        assert ((got.float() - exact.t()).norm() / exact.norm()).item() < 0.03
    assert torch.equal(mlp(x), fused)


@pytest.mark.parametrize("spec", [INT8, QuantSpec(bits=4, quant_type="nf4")], ids=["int8", "nf4"])
def test_experts_in_one_call_give_the_per_expert_loops_bits(lib, spec: QuantSpec) -> None:
    if spec.bits == 4:
        assert kernels.native_4bit_available(), "the 4-bit kernels run wherever the 8-bit ones do"
    experts = [_mlp(spec, seed=20 + i) for i in range(3)]
    fused = [e.one_token_kernel() for e in experts]
    assert all(k is not None and k.kind == fused[0].kind for k in fused)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(13)).bfloat16()
    mix = torch.tensor([0.41, 0.33, 0.26]).bfloat16().tolist()
    loop = torch.zeros_like(x)
    for expert, weight in zip(experts, mix):
        loop += expert(x) * weight
    out = torch.zeros_like(x)
    accumulate_experts(fused, mix, x, out)  # type: ignore[arg-type]
    assert torch.equal(out, loop)


def _moe(spec: QuantSpec, hidden: int = 1024, inter: int = 704, experts: int = 16, top_k: int = 6) -> MoE:
    """A MoE layer of quantized random experts (no shared ones): 704 is 11 activation blocks and 22 tiles."""
    config = DeepseekConfig(vocab_size=8, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
                            num_attention_heads=1, num_key_value_heads=1, moe_intermediate_size=inter,
                            n_routed_experts=experts, num_experts_per_tok=top_k)
    torch.manual_seed(30)
    moe = MoE(config, 0, ExpertChannel())
    for expert in moe.experts:
        for name in ("gate_proj", "up_proj", "down_proj"):
            dense = getattr(expert, name)
            setattr(expert, name, quantize_linear(dense.weight.detach() * 4, spec, torch.bfloat16))
    return moe


def _routing(tokens: int, experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A router's output (ids ascending per token, weights) where expert 0 takes every token,
    expert 3 exactly one and expert 5 none, so groups of rows, a lone token and a gap all occur."""
    scores = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(31))
    scores[:, 0] += 10
    scores[:, 3] = -10
    scores[7, 3] = 20
    scores[:, 5] = -20
    weights, ids = scores.softmax(-1).topk(top_k, dim=-1)
    ids, order = ids.sort(dim=-1)
    return ids, weights.gather(-1, order)


def _route_both_ways(moe: MoE, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                     monkeypatch) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(the native route, the per-expert loop's, how many native calls ran)."""
    calls = []
    monkeypatch.setattr(deepseek, "route_experts", lambda *args: (calls.append(1), route_experts(*args)))
    with torch.inference_mode():
        fused = moe.route(x, ids, weights)
        with monkeypatch.context() as patch:
            patch.setattr(MoE, "_prefill_kernels", lambda self, x, counts: None)
            loop = moe.route(x, ids, weights)
    return fused, loop, len(calls)


@pytest.mark.parametrize("spec,tokens", [(QuantSpec(bits=4, quant_type="nf4"), 40),
                                         (QuantSpec(bits=4, quant_type="fp4"), 17), (INT8, 11)],
                         ids=["nf4", "fp4", "int8"])
def test_routed_experts_over_many_tokens_give_the_loops_bits(lib, spec: QuantSpec, tokens: int, monkeypatch) -> None:
    """Prefill's two native calls per MoE layer against MoE.route's per-expert loop, at a geometry
    with several tiles and blocks, expert 0 on 40 rows (groups and a remainder) and one lone token."""
    moe = _moe(spec)
    x = torch.randn(tokens, 1024, generator=torch.Generator().manual_seed(32)).bfloat16()
    ids, weights = _routing(tokens, 16, 6)
    fused, loop, calls = _route_both_ways(moe, x, ids, weights, monkeypatch)
    assert calls == 1
    assert torch.equal(fused, loop)
    assert loop.abs().amax().item() > 0


def test_8bit_experts_with_many_rows_keep_the_loop(lib, monkeypatch) -> None:
    """From INT_MM_MIN_ROWS rows an 8-bit layer runs torch._int_mm (on VNNI), which the native calls
    do not reproduce, so such a layer keeps the loop."""
    moe = _moe(INT8)
    tokens = kernels.INT_MM_MIN_ROWS
    x = torch.randn(tokens, 1024, generator=torch.Generator().manual_seed(33)).bfloat16()
    fused, loop, calls = _route_both_ways(moe, x, *_routing(tokens, 16, 6), monkeypatch)
    assert calls == (0 if kernels.int_mm_for_many_rows() else 1)
    assert torch.equal(fused, loop)


@pytest.mark.parametrize("bits,tokens", [(4, 40), (8, 9)])
def test_prefill_with_native_routed_experts_gives_the_loops_logits(lib, bits: int, tokens: int, monkeypatch) -> None:
    """The whole model (the demo: its dimensions take the native kernels, the tiny fixture's
    32-wide experts do not): the same logits, bit for bit, with the native route as without."""
    model, _ = load(DEMO_MODEL_PATH, bits=bits)
    prompt = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(34))
    calls = []
    monkeypatch.setattr(deepseek, "route_experts", lambda *args: (calls.append(1), route_experts(*args)))
    with torch.inference_mode():
        fused = model(prompt)
        monkeypatch.setattr(MoE, "_prefill_kernels", lambda self, x, counts: None)
        loop = model(prompt)
    assert len(calls) == len(model.moe_layers())
    assert torch.equal(fused, loop)


def test_no_one_call_path_for_mixed_or_fp32_layers(lib) -> None:
    int8, nf4 = _mlp(INT8), _mlp(QuantSpec(bits=4, quant_type="nf4"))
    assert swiglu_kernel(int8.gate_proj, int8.up_proj, nf4.down_proj) is None
    assert swiglu_kernel(int8.gate_proj, int8.up_proj, MLP(256, 128).down_proj) is None
    fp32 = MLP(256, 128)
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(fp32, name, quantize_linear(getattr(fp32, name).weight.detach(), INT8, torch.float32))
    assert swiglu_kernel(fp32.gate_proj, fp32.up_proj, fp32.down_proj) is None


@pytest.mark.parametrize("bits", [4, 8])
def test_offloaded_experts_decode_like_resident_ones_on_the_native_path(lib, bits: int) -> None:
    """The store runs each expert's MLP module, so both take the same one-call path, bit for bit."""
    prompt = torch.randint(0, 2048, (1, 9), generator=torch.Generator().manual_seed(10))
    resident, _ = load(DEMO_MODEL_PATH, bits=bits)
    expert = resident.moe_layers()[0].experts[0]
    assert expert.one_token_kernel() is not None
    offloaded, _, store = load_offloaded(DEMO_MODEL_PATH, OffloadOptions(Budgets(expert_cache=1), "lru", False),
                                         bits=bits)
    with torch.inference_mode():
        want = resident.generate(prompt, max_new_tokens=6)
        assert torch.equal(offloaded.generate(prompt, max_new_tokens=6), want)
    assert store.stats.misses() > 0
    store.detach()


@pytest.mark.parametrize("slots,fused_layers", [(16, 3), (2, 0)], ids=["all-experts-in-slots", "two-slots"])
def test_a_store_serving_a_whole_pass_prefills_in_the_native_route_like_resident_experts(
        lib, slots: int, fused_layers: int, monkeypatch) -> None:
    """With every expert a 40-token pass needs in the store's slots, the prefill takes the resident
    model's native route over the slots' modules (one call per MoE layer of the demo's 3); with two
    slots each expert comes through ``run``. Both give the resident model's logits, bit for bit."""
    prompt = torch.randint(0, 2048, (1, 40), generator=torch.Generator().manual_seed(12))
    resident, _ = load(DEMO_MODEL_PATH, bits=4)
    offloaded, _, store = load_offloaded(DEMO_MODEL_PATH, OffloadOptions(Budgets(expert_cache=slots), "lru", False),
                                         bits=4)
    calls = []
    monkeypatch.setattr(deepseek, "route_experts", lambda *args: (calls.append(1), route_experts(*args)))
    with torch.inference_mode():
        want = resident(prompt)
        calls.clear()
        got = offloaded(prompt)
    assert len(calls) == fused_layers == (len(offloaded.moe_layers()) if slots == 16 else 0)
    assert torch.equal(got, want)
    store.detach()


@pytest.mark.parametrize("n_heads,n_kv", [(8, 8), (8, 2)])
def test_attention_decode_matches_the_pytorch_step(lib, n_heads: int, n_kv: int) -> None:
    """Rotary and the cache write are PyTorch's bits; the attention output agrees to bf16 precision."""
    from dsmoe.model.deepseek import _one_query_attention, apply_rotary

    head_dim, pos, capacity = 64, 37, 50
    gen = torch.Generator().manual_seed(11)
    keys = torch.randn(1, n_kv, capacity, head_dim, generator=gen).bfloat16()
    values = torch.randn(1, n_kv, capacity, head_dim, generator=gen).bfloat16()
    q = torch.randn(n_heads * head_dim, generator=gen).bfloat16()
    k = torch.randn(n_kv * head_dim, generator=gen).bfloat16()
    v = torch.randn(n_kv * head_dim, generator=gen).bfloat16()
    angles = torch.rand(head_dim // 2, generator=gen) * 6
    cos, sin = torch.cat([angles, angles]).cos().bfloat16(), torch.cat([angles, angles]).sin().bfloat16()

    want_keys, want_values = keys.clone(), values.clone()
    q4 = apply_rotary(q.view(1, n_heads, 1, head_dim), cos, sin)
    want_keys[:, :, pos] = apply_rotary(k.view(1, n_kv, 1, head_dim), cos, sin)[:, :, 0]
    want_values[:, :, pos] = v.view(1, n_kv, head_dim)
    want = _one_query_attention(q4, want_keys[:, :, : pos + 1], want_values[:, :, : pos + 1]).reshape(-1)

    got = attention_decode(q, k, v, cos, sin, keys, values, pos, n_heads)
    assert torch.equal(keys, want_keys) and torch.equal(values, want_values)
    torch.testing.assert_close(got, want, rtol=0.016, atol=0.016)


def test_decode_with_native_attention_follows_the_pytorch_path(lib, monkeypatch) -> None:
    import dsmoe.model.deepseek as deepseek

    model, _ = load(DEMO_MODEL_PATH)  # bf16: attention takes the native path when decoding
    prompt = torch.randint(0, 2048, (1, 12), generator=torch.Generator().manual_seed(12))

    def decode_logits() -> torch.Tensor:
        cache = model.new_cache(1, 32)
        steps = [model(prompt, cache=cache, last_only=True)]
        for token in (5, 77, 1200, 9):
            steps.append(model(torch.tensor([[token]]), cache=cache))
        return torch.cat(steps, dim=1)

    with torch.inference_mode():
        native = decode_logits()
        monkeypatch.setattr(deepseek, "native_attention", lambda x, head_dim: False)
        pytorch = decode_logits()
    torch.testing.assert_close(native[:, 0], pytorch[:, 0], rtol=0, atol=0)  # the prompt: same path
    torch.testing.assert_close(native, pytorch, rtol=0.05, atol=0.05)
    assert torch.equal(native.argmax(-1), pytorch.argmax(-1))


def test_rms_norm_row_matches_the_module(lib) -> None:
    """One row goes native; two rows take PyTorch's ops. Sums of squares may add up in another
    order, so an output may move by one bf16 step, rarely."""
    from dsmoe.model.deepseek import RMSNorm

    norm = RMSNorm(2048, 1e-6)
    norm.weight.data = torch.rand(2048, generator=torch.Generator().manual_seed(14)) + 0.5
    norm = norm.bfloat16()
    x = (torch.randn(1, 1, 2048, generator=torch.Generator().manual_seed(15)) * 3).bfloat16()
    with torch.inference_mode():
        native, torch_rows = norm(x), norm(x.repeat(1, 2, 1))
    assert torch.equal(native, rms_norm_row(x, norm.weight, norm.eps))
    for row in torch_rows[0]:
        differ = native[0, 0] != row
        assert differ.float().mean().item() < 0.01
        torch.testing.assert_close(native[0, 0], row, rtol=2**-7, atol=0)


@pytest.mark.parametrize("top_k,norm_topk", [(6, True), (6, False), (1, True)])
def test_router_for_one_token_matches_the_module(lib, top_k: int, norm_topk: bool) -> None:
    from types import SimpleNamespace

    from dsmoe.model.deepseek import MoEGate

    config = SimpleNamespace(num_experts_per_tok=top_k, norm_topk_prob=norm_topk, n_routed_experts=64, hidden_size=2048)
    gate = MoEGate(config)  # type: ignore[arg-type]
    gate.weight.data = torch.randn(64, 2048, generator=torch.Generator().manual_seed(16)) * 0.02
    for seed in range(5):
        x = torch.randn(1, 2048, generator=torch.Generator().manual_seed(100 + seed)).bfloat16()
        with torch.inference_mode():
            ids, weights = gate(x)  # native
            want_ids, want_weights = gate(x.repeat(2, 1))  # PyTorch's ops
        assert ids.dtype == want_ids.dtype and weights.dtype == want_weights.dtype
        assert torch.equal(ids, want_ids[:1])
        torch.testing.assert_close(weights, want_weights[:1], rtol=1e-5, atol=1e-7)
        if norm_topk and top_k > 1:
            assert abs(weights.sum().item() - 1) < 1e-5


@pytest.mark.parametrize("shape", [(32, 4), (32, 64), (96, 256), (64, 64 * 11)], ids=str)
def test_native_repack_is_the_torch_permutation(lib, shape: tuple[int, int]) -> None:
    """The load-time repack into the kernels' layout, in C, gives pack_4bit_torch's bytes (whose own
    layout test_quant_formats checks against the layout's definition)."""
    n, k = shape
    packed = torch.randint(0, 256, (n * k // 2, 1), dtype=torch.uint8, generator=torch.Generator().manual_seed(n + k))
    assert torch.equal(kernels.pack_4bit(packed, "native", n, k), kernels.pack_4bit_torch(packed, "native", n, k))
    out = torch.empty(40 * 64 // 2, dtype=torch.uint8)
    assert lib.dsmoe_pack_4bit(40, 64, packed.data_ptr(), out.data_ptr()) == -1  # not whole tiles


@pytest.mark.parametrize("shape", [(32, 64), (96, 128), (1408, 2048)])
def test_the_repack_in_place_rewrites_the_weight_it_was_given(lib, shape: tuple[int, int]) -> None:
    """A loaded weight repacked in its own memory (no second copy) gives the torch permutation's bytes,
    tile after tile, with several tiles per thread."""
    n, k = shape
    packed = torch.randint(0, 256, (n * k // 2, 1), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    expected = kernels.pack_4bit_torch(packed, "native", n, k)
    given = packed.clone()
    native = kernels.pack_4bit(given, "native", n, k, in_place=True)
    assert native.data_ptr() == given.data_ptr()
    assert torch.equal(native, expected)
    assert torch.equal(packed.view(n, k // 2), kernels.unpack_4bit(native, "native", n, k).view(n, k // 2))
