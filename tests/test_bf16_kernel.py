"""dsmoe's bf16 matmul (native/bf16.c) and the layers that run it: float models and float lm_heads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsmoe import load
from dsmoe.native.library import BF16_K_STEP
from dsmoe.checkpoint.reader import open_checkpoint
from dsmoe.offload.disk import DiskExperts
from dsmoe.quant import Bf16Linear, float_linear, kernels, native_bf16_linears


def _bf16(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _within_fp32_sums(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """out is the exact product (float64) rounded once to bf16, give or take what fp32 sums in any
    order may add: half a bf16 step of the result plus k fp32 steps of sum |x| |w|."""
    exact = x.double() @ w.double().T
    magnitude = x.double().abs() @ w.double().abs().T
    bound = exact.abs() * 2.0**-8 + magnitude * x.shape[1] * 2.0**-24
    assert ((out.double() - exact).abs() <= bound).all()


# Every remainder of the kernel's blocks: rows 1-9 (groups of 4), outputs 1-13 (groups of 3), widths of one
# step and of many, a pass boundary (256 KiB of fp32 rows: 32 rows at k = 2048).
@pytest.mark.parametrize("m, n, k", [(1, 1, 16), (1, 7, 16), (2, 5, 32), (3, 13, 48), (5, 10, 64), (9, 31, 2048),
                                     (1, 2048, 1408), (37, 20, 2048), (64, 9, 512)])
def test_bf16_matmul_is_the_exact_product_rounded_once(lib, m, n, k):
    x, w = _bf16((m, k), 1), _bf16((n, k), 2)
    out = kernels.bf16_native_mm(x, w)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    _within_fp32_sums(out, x, w)
    # PyTorch's bf16 linear sums in fp32 too: the two differ by one bf16 step at most, on few entries.
    peer = F.linear(x, w)
    steps = (out.float() - peer.float()).abs() / peer.float().abs().clamp_min(1e-30) * 2**8
    assert (steps <= 1.0 + 1e-6).all()
    assert (out == peer).float().mean() > 0.9


def test_bf16_matmul_refuses_what_it_cannot_take(lib):
    x, w = _bf16((2, BF16_K_STEP + 8), 1), _bf16((3, BF16_K_STEP + 8), 2)
    out = torch.empty(2, 3, dtype=torch.bfloat16)
    assert lib.dsmoe_bf16_matmul(2, 3, BF16_K_STEP + 8, x.data_ptr(), w.data_ptr(), out.data_ptr()) == -1
    assert lib.dsmoe_bf16_matmul(0, 3, BF16_K_STEP, x.data_ptr(), w.data_ptr(), out.data_ptr()) == -1


def test_bf16_linear_runs_the_kernel_and_falls_back_for_other_inputs(lib, monkeypatch):
    w = _bf16((24, 64), 3)
    layer = float_linear(w)
    assert isinstance(layer, Bf16Linear) and layer.weight.data_ptr() == w.data_ptr()
    calls = []
    real = kernels.bf16_native_mm
    monkeypatch.setattr(kernels, "bf16_native_mm", lambda x, weight: calls.append(x.shape) or real(x, weight))
    x = _bf16((2, 5, 64), 4)
    out = layer(x)
    assert calls == [(10, 64)] and out.shape == (2, 5, 24)
    _within_fp32_sums(out.reshape(10, 24), x.reshape(10, 64), w)
    # Autograd and an empty batch are F.linear's, not the kernel's.
    assert layer(x[:0]).shape == (0, 5, 24)
    grad_input = x.clone().requires_grad_()
    assert torch.equal(layer(grad_input).detach(), F.linear(x, w))
    trained = Bf16Linear(nn.Parameter(w.clone()))  # a weight that wants its gradient
    assert trained.weight.requires_grad
    trained(x).float().sum().backward()
    assert trained.weight.grad is not None
    assert calls == [(10, 64)]
    # A width off the kernel's step, or fp32 weights, stay nn.Linear.
    assert type(float_linear(_bf16((4, BF16_K_STEP + 8), 5))) is nn.Linear
    assert type(float_linear(w.float())) is nn.Linear


def test_a_bf16_model_runs_every_linear_through_the_kernel(lib, tiny_path):
    model, _ = load(tiny_path)  # bf16, the default compute dtype
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, Bf16Linear) for m in linears)
    ids = torch.tensor([[1, 5, 9, 200, 17, 3, 44, 8]])
    with torch.inference_mode():
        native = model(ids)
    # The same model with PyTorch's matmul: each Bf16Linear back to an nn.Linear on the same weight.
    for name, module in list(model.named_modules()):
        if isinstance(module, Bf16Linear):
            plain = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
            plain.weight = module.weight
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, plain)
    with torch.inference_mode():
        peer = model(ids)
    assert native.argmax(-1).eq(peer.argmax(-1)).float().mean() > 0.85
    assert (native.float() - peer.float()).abs().max() < 0.05 * peer.float().abs().max()
    assert native_bf16_linears(model) == len(linears)


def test_experts_read_from_disk_in_bf16_run_the_kernel(lib, tiny_path):
    checkpoint = open_checkpoint(tiny_path)
    disk = DiskExperts(checkpoint, torch.bfloat16)
    built = disk.build(1, 3)
    assert all(isinstance(getattr(built, p), Bf16Linear) for p in ("gate_proj", "up_proj", "down_proj"))
    assert type(DiskExperts(checkpoint, torch.float32).build(1, 3).gate_proj) is nn.Linear
    disk.close()
