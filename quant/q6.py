"""dsmoe's 6-bit format ("q6"), for the lm_head of 4-bit runs: the plain-torch reference.

Per row, per block of ``ACT_BLOCK`` (64) values: one fp16 step, ``fp16(absmax / Q6_MAX)``, and
codes ``q = clamp(round(w / step), -31, 31)`` stored as ``u = q + 32`` in ``Q6_BLOCK_BYTES`` (48)
bytes: 32 bytes of low nibbles (byte j: ``u[j]`` low, ``u[j + 32]`` high), then 16 bytes of the top
two bits (byte j: ``u[j]``, ``u[j + 16]``, ``u[j + 32]``, ``u[j + 48]`` from bit 0 up). 6.25 bits a
weight. native/q6.c says why this order (it unpacks with a few shifts); ``dsmoe_quantize_q6`` is
the same quantizer in C, byte for byte, and ``dsmoe_q6_gemv`` the kernel.

The step is fp16 rather than bf16: it is stored once per 64 weights either way, and fp16's 10-bit
mantissa moves the step by at most 2^-11 of itself, bf16's by 2^-8.
"""

from __future__ import annotations

import ctypes as ct

import torch

from dsmoe.errors import UsageError
from dsmoe.native.library import ACT_BLOCK, DTYPE_BF16, DTYPE_F16, DTYPE_F32, Q6_BLOCK_BYTES, Q6_MAX, check_status

Q6_STEPS = "q6_steps"
"""``X.weight.q6_steps``: the fp16 steps stored beside a q6 ``X.weight`` (its codes)."""

_NATIVE_DTYPES = {torch.float32: DTYPE_F32, torch.bfloat16: DTYPE_BF16, torch.float16: DTYPE_F16}
_OFFSET = Q6_MAX + 1
_HALF, _QUARTER = ACT_BLOCK // 2, ACT_BLOCK // 4


def check_shape(weight: torch.Tensor) -> None:
    """A q6 weight is 2-D float with whole blocks of ACT_BLOCK per row."""
    if weight.dim() != 2 or not weight.is_floating_point() or weight.shape[1] % ACT_BLOCK:
        raise UsageError(f"the 6-bit format needs a 2-D float weight {ACT_BLOCK} values wide per block, "
                         f"got {weight.dtype} {list(weight.shape)}")


def quantize_q6(weight: torch.Tensor, rows_per_step: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [n, k / 64 * 48], steps fp16 [n, k / 64]); rows in steps so the fp32
    temporaries stay small for lm_head."""
    check_shape(weight)
    n, k = weight.shape
    blocks = k // ACT_BLOCK
    packed = torch.empty(n, blocks * Q6_BLOCK_BYTES, dtype=torch.uint8)
    steps = torch.empty(n, blocks, dtype=torch.float16)
    for start in range(0, n, rows_per_step):
        w = weight[start : start + rows_per_step].float().reshape(-1, blocks, ACT_BLOCK)
        step16 = (w.abs().amax(-1) / Q6_MAX).to(torch.float16)
        if torch.isinf(step16).any():
            raise UsageError("a weight is too large for the 6-bit format's fp16 steps (|w| > 2e6)")
        step = step16.float().unsqueeze(-1)
        q = torch.where(step > 0, torch.round(w / step), torch.zeros_like(w)).clamp_(-Q6_MAX, Q6_MAX)
        u = (q + _OFFSET).to(torch.uint8)
        low = (u[..., :_HALF] & 15) | ((u[..., _HALF:] & 15) << 4)
        top = u >> 4
        high = top[..., :_QUARTER] | (top[..., _QUARTER:_HALF] << 2) | (top[..., _HALF:3 * _QUARTER] << 4) \
            | (top[..., 3 * _QUARTER:] << 6)
        packed[start : start + rows_per_step] = torch.cat([low, high], -1).reshape(-1, blocks * Q6_BLOCK_BYTES)
        steps[start : start + rows_per_step] = step16
    return packed, steps


def dequantize_q6(packed: torch.Tensor, steps: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [n, k] the codes and steps stand for: q * step."""
    n, blocks = steps.shape
    b = packed.reshape(n, blocks, Q6_BLOCK_BYTES)
    low, high = b[..., :_HALF], b[..., _HALF:]
    nibbles = torch.cat([low & 15, low >> 4], -1)
    top = torch.cat([(high >> s) & 3 for s in (0, 2, 4, 6)], -1)
    q = (nibbles | (top << 4)).float() - _OFFSET
    return (q * steps.float().unsqueeze(-1)).reshape(n, blocks * ACT_BLOCK).to(dtype)


def quantize_q6_native(lib: ct.CDLL, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_q6``'s output, bit for bit, from the native quantizer (a CPU tensor in fp32/bf16/fp16)."""
    check_shape(weight)
    source = weight.contiguous()
    n, k = source.shape
    packed = torch.empty(n, k // ACT_BLOCK * Q6_BLOCK_BYTES, dtype=torch.uint8)
    steps = torch.empty(n, k // ACT_BLOCK, dtype=torch.float16)
    status = lib.dsmoe_quantize_q6(source.data_ptr(), _NATIVE_DTYPES[source.dtype], n, k, packed.data_ptr(),
                                   steps.data_ptr())
    if status == -1:
        raise UsageError("a weight is too large for the 6-bit format's fp16 steps (|w| > 2e6)")
    check_status(status, "q6 quantizer")
    return packed, steps


def q6_native_mm(lib: ct.CDLL, x: torch.Tensor, packed: torch.Tensor, steps: torch.Tensor,
                 out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x [M, in] bf16 @ dequant(W).T with x rounded to int8 per block of 64, by ``dsmoe_q6_gemv``;
    ``out_dtype`` bf16 (what the layer returns) or fp32 (the kernel's sums, which the tests check)."""
    x = x.contiguous()
    rows, (out_features, blocks) = x.shape[0], steps.shape
    out = torch.empty(rows, out_features, dtype=out_dtype)
    check_status(lib.dsmoe_q6_gemv(rows, out_features, blocks * ACT_BLOCK, x.data_ptr(), packed.data_ptr(),
                                   steps.data_ptr(), out.data_ptr(), int(out_dtype == torch.float32)), "q6 matmul")
    return out
