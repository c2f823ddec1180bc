"""Matmul kernels for quantized weights, and the rule that picks one per call.

The rule (see docs/PERFORMANCE.md for the measurements behind it), on CPU:

* 4-bit, bf16 compute: the weight is repacked once at load. With dsmoe's native library built
  (AVX512-VNNI or AVX2), into dsmoe's layout (``pack_4bit``) for its own C kernel, at any row count: the block
  scales in tile-major order, the same int8 activations as the 8-bit kernel, the codebook through a
  16-entry byte table to integers so the dot products are integer ones, and for several rows each
  tile's codes unpacked once for all of them (1.85-2.3x bitsandbytes' kernel at one row, 2.0-2.2x
  at 64). Without it, on AVX512-BF16, into bitsandbytes' CPU layout for its fused kernel
  (``gemv_4bit``); elsewhere bitsandbytes dequantizes per call (on AVX2, 16B-8L decoded at
  0.9 tok/s that way against 24 tok/s with dsmoe's kernel; docs/PERFORMANCE.md).
  Other compute dtypes (fp32 for quality runs, fp16) dequantize with bitsandbytes and use
  ``F.linear``, which is exact.
* 8-bit, bf16 compute, fewer than ``INT_MM_MIN_ROWS`` rows (decode): dsmoe's own C kernel
  (``native/matmul.c``) when it was built and the CPU has AVX512-VNNI or AVX2: the activations
  are rounded to int8 in blocks of 64 (llama.cpp's Q8_0 activations) and integer dot products do
  the work. Without it, ``torch._weight_int8pack_mm`` (int8 weight, float activations), exactly
  ``dequant(W) @ x``: 2x bf16 at one row. fp32 compute keeps int8pack.
* 8-bit, bf16 compute, ``INT_MM_MIN_ROWS`` rows or more (prefill, batched scoring), on AVX512-VNNI
  or without dsmoe's library (with AVX2 alone, dsmoe's kernel at every row count; see
  ``int_mm_for_many_rows``): ``torch._int_mm`` on row-wise int8 activations, which is LLM.int8's
  vector-wise quantization without its outlier split (bitsandbytes' own int8 matmul also rounds the activations). It was
  1.2-1.5x bf16 at 64 rows on every 16B shape where int8pack was 0.26-0.38x; the crossover is at
  8-16 rows. It rounds the activations, so its output error is ~3.5x int8pack's (0.8% vs 0.23%).
  fp32 compute (quality runs) keeps int8pack at every size.

* A SwiGLU MLP for one bf16 token runs as one native call, and so do a token's routed experts
  together, saving the Python work of three module calls and two elementwise ops per expert; a
  MoE layer's routed experts over a prompt's tokens run as two (``linear.route_experts``).

* bf16 weights (a float model, a float lm_head) on the CPU: dsmoe's bf16 kernel
  (``bf16_native_mm``, ``linear.Bf16Linear``), fp32 sums of exact products, where PyTorch's CPU bf16
  matmul ran at ~5 GMAC/s for every shape here.

On CUDA, bitsandbytes' own kernels (``matmul_4bit`` and ``matmul``) on the standard layout.
"""

from __future__ import annotations

import ctypes as ct
import dataclasses
import functools
from typing import Callable

import torch

from dsmoe.native.library import ISA_VNNI, TILE_ROWS, check_status, native_library
from dsmoe.quant.state import codebook

CPU_BLOCK_N = TILE_ROWS
"""Output rows per tile in the CPU 4-bit layouts (bitsandbytes' and dsmoe's, which share its tiles)."""


def cpu_4bit_kernel_available() -> bool:
    """bitsandbytes registers its fused CPU 4-bit kernel only on CPUs with AVX512-BF16."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def can_pack_for_cpu(out_features: int, in_features: int, blocksize: int) -> bool:
    """The CPU layout tiles 32 output rows and needs whole absmax blocks per row."""
    return out_features % CPU_BLOCK_N == 0 and in_features % blocksize == 0


def pack_4bit(packed: torch.Tensor, layout: str, out_features: int, in_features: int,
              in_place: bool = False) -> torch.Tensor:
    """Standard bitsandbytes nibbles (row-major, high nibble first) -> a CPU kernel's layout, [out, in/2].

    Both tile 32 output rows, with rows r (low nibble) and 16 + r (high nibble) of a column in one
    byte. ``"cpu"``, bitsandbytes' kernel's: byte (tile, j, r, c) holds column 2j + c. ``"native"``,
    dsmoe's kernel's: byte (tile, q, r, i) holds column 4q + i, so each 4-byte word is four
    consecutive columns of one row pair, what a VNNI dot product takes with no shuffle. Both are
    pure permutations of the 4-bit codes; ``unpack_4bit`` inverts them exactly.

    ``in_place``: ``packed`` is the caller's to give up (a weight just read for this module), and
    the native repack rewrites its memory instead of filling a new tensor: at load, the new
    tensor's page faults cost more than the permutation itself (0.15-0.36 s against 0.05 s for
    288 MB).
    """
    n, k = out_features, in_features
    lib = native_library()
    if layout == "native" and lib is not None and packed.device.type == "cpu":
        source = packed.contiguous()
        out = source.view(n, k // 2) if in_place else torch.empty(n, k // 2, dtype=torch.uint8)
        check_status(lib.dsmoe_pack_4bit(n, k, ct.c_void_p(source.data_ptr()), ct.c_void_p(out.data_ptr())),
                     "4-bit repack")
        return out
    return pack_4bit_torch(packed, layout, n, k)


def pack_4bit_torch(packed: torch.Tensor, layout: str, out_features: int, in_features: int) -> torch.Tensor:
    """``pack_4bit`` in torch: the reference for the native repack, and its stand-in without the library."""
    n, k = out_features, in_features
    flat = packed.reshape(-1)
    codes = torch.stack((flat >> 4, flat & 0xF), dim=-1)  # [n * k/2, 2]: columns 2j, 2j+1
    tiles = codes.view(n // CPU_BLOCK_N, 2, CPU_BLOCK_N // 2, k // 2, 2)
    pairs = (tiles[:, 1] << 4) | tiles[:, 0]  # [tiles, r, j, c]
    if layout == "cpu":
        return pairs.permute(0, 2, 1, 3).contiguous().view(n, k // 2)
    quads = pairs.view(n // CPU_BLOCK_N, CPU_BLOCK_N // 2, k // 4, 4)  # [tiles, r, q, i]
    return quads.permute(0, 2, 1, 3).contiguous().view(n, k // 2)


def unpack_4bit(weight: torch.Tensor, layout: str, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of ``pack_4bit``: the standard layout, shaped [out*in/2, 1] as bitsandbytes stores it."""
    n, k = out_features, in_features
    if layout == "cpu":
        pairs = weight.view(n // CPU_BLOCK_N, k // 2, CPU_BLOCK_N // 2, 2).permute(0, 2, 1, 3)
    else:
        quads = weight.view(n // CPU_BLOCK_N, k // 4, CPU_BLOCK_N // 2, 4).permute(0, 2, 1, 3)
        pairs = quads.reshape(n // CPU_BLOCK_N, CPU_BLOCK_N // 2, k // 2, 2)
    halves = torch.stack((pairs & 0xF, pairs >> 4), dim=1)  # [tiles, 2, r, j, c]
    codes = halves.reshape(n * k // 2, 2)
    return ((codes[:, 0] << 4) | codes[:, 1]).view(-1, 1)


def dequantize_4bit_lookup(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                           shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """Codebook lookup times block absmax, in plain torch: bitsandbytes' format, any shape.

    bitsandbytes' CPU ``dequantize_4bit`` (0.50) gives wrong numbers when a row's width is not a
    multiple of the blocksize (a block then spans two rows), so those shapes come here.
    """
    n = shape[0] * shape[1]
    flat = packed.reshape(-1)
    idx = torch.stack((flat >> 4, flat & 0xF), dim=-1).reshape(-1)[:n].long()
    values = code.float()[idx]
    pad = (-n) % blocksize
    if pad:
        values = torch.cat([values, values.new_zeros(pad)])
    values = (values.view(-1, blocksize) * absmax.float().view(-1, 1)).reshape(-1)[:n]
    return values.view(shape).to(dtype)


def cpu_4bit_entry(quant_type: str) -> Callable[..., None] | None:
    """bitsandbytes' C function behind its CPU ``gemv_4bit`` op, or None if this build lacks it.

    The op's Python wrapper reads the codebook back from the tensor on every call to tell NF4 from
    FP4 (a device sync) and re-checks dtypes; for a decode step of ~20 matmuls per layer that
    costs more than some of the matmuls. The format is fixed at load, so dsmoe calls the C
    function itself (ctypes releases the GIL around it).
    """
    from bitsandbytes.cextension import lib

    return getattr(lib, f"gemv_4bit_inference_cpu_{quant_type}_bf16", None)


def gemv_4bit_cpu(x: torch.Tensor, cpu_packed: torch.Tensor, shape: tuple[int, int],
                  absmax_t: torch.Tensor, code: torch.Tensor, blocksize: int,
                  entry: Callable[..., None] | None = None) -> torch.Tensor:
    """x [M, in] bf16 @ W.T with W in the CPU layout; ``absmax_t`` is [in/blocksize, out] bf16.

    With ``entry`` (from ``cpu_4bit_entry``) the C kernel is called directly; the numbers are the
    op's own, bit for bit.
    """
    if entry is None:
        return torch.ops.bitsandbytes.gemv_4bit.default(x, cpu_packed, list(shape), absmax_t, code, blocksize)
    x = x.contiguous()
    rows, (out_features, in_features) = x.shape[0], shape
    out = torch.empty(rows, out_features, dtype=torch.bfloat16)
    # ctypes passes bare Python ints as 32-bit C ints: sizes and addresses are wrapped as 64-bit.
    entry(ct.c_int64(rows), ct.c_int64(out_features), ct.c_int64(in_features), ct.c_void_p(x.data_ptr()),
          ct.c_void_p(cpu_packed.data_ptr()), ct.c_void_p(absmax_t.data_ptr()), ct.c_void_p(out.data_ptr()),
          ct.c_int64(blocksize), ct.c_int64(in_features), ct.c_int64(out_features))
    return out


INT_MM_MIN_ROWS = 12
"""Rows from which dynamic int8 activations with ``torch._int_mm`` beat int8pack (measured crossover 8-16)."""


def int_mm_for_many_rows() -> bool:
    """Whether prefill-sized 8-bit matmuls go to ``torch._int_mm`` rather than dsmoe's kernel.

    Only on AVX512-VNNI, where _int_mm was measured (oneDNN's VNNI GEMM). With AVX2 alone it is
    23-25x slower than dsmoe's kernel at 64 rows on the 16B shapes (185 ms against 8 ms for an
    expert's 1408 x 2048, 1.4 s against 80 ms for 10944 x 2048, one thread), slower even than bf16.
    """
    lib = native_library()
    return lib is None or lib.dsmoe_native_isa() == ISA_VNNI


def int8_dynamic_mm(x: torch.Tensor, weight_t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, in] @ (weight * scale[:, None]).T with x rounded to int8 per row (LLM.int8, no outliers).

    ``weight_t`` is the int8 weight transposed, [in, out]; int8 x int8 products add up in int32.
    """
    xf = x.float()
    row_max = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    xq = torch.round(xf * (127.0 / row_max)).to(torch.int8)
    rows = xq.shape[0]
    if rows <= 16:  # _int_mm wants more than 16 rows
        xq = torch.cat([xq, xq.new_zeros(17 - rows, xq.shape[1])])
    acc = torch._int_mm(xq, weight_t)[:rows]
    return (acc.float() * (row_max / 127.0) * scale).to(x.dtype)


def native_4bit_available() -> bool:
    """Whether the native 4-bit kernels run here: they need AVX512-VNNI or AVX2 (every CPU with
    bitsandbytes' CPU layout, AVX512-BF16, has both)."""
    lib = native_library()
    return lib is not None and bool(lib.dsmoe_native_4bit())


@dataclasses.dataclass(frozen=True)
class Codebook:
    """The native 4-bit kernels' view of a codebook: code -> ``table[code] - 128`` steps of ``unit``.

    Unsigned bytes, so vpdpbusd takes them straight against int8 activations (the kernel takes the
    +128 back out). ``unit`` is the step of 1/127 .. 1/64 that holds the codebook best (least
    squared error): 1/120 holds FP4's values exactly, where 1/127 moved all its 0.5s by 0.8%.
    """

    table: torch.Tensor
    unit: float

    @property
    def address(self) -> int:
        return self.table.data_ptr()


@functools.cache
def native_codebook(quant_type: str) -> Codebook:
    """One per format, so kernels can tell formats apart by the table's address."""
    values = codebook(quant_type).double()

    def error(steps: int) -> float:
        return float((torch.round(values * steps) / steps - values).pow(2).sum())

    steps = min(range(64, 128), key=error)
    table = (torch.round(values * steps).to(torch.int32) + 128).to(torch.uint8).contiguous()
    return Codebook(table, 1.0 / steps)


def tile_major_scales(absmax: torch.Tensor, out_features: int, in_features: int, blocksize: int) -> torch.Tensor:
    """Block scales [out * in / blocksize] (row-major, fp32) as the native 4-bit kernels read them:
    bf16, [out / 32, in / blocksize, 32], so each 32-row tile's scales are one contiguous run."""
    tiles = absmax.float().view(out_features // CPU_BLOCK_N, CPU_BLOCK_N, in_features // blocksize)
    return tiles.permute(0, 2, 1).to(torch.bfloat16).contiguous().view(-1)


def native_4bit_mm(x: torch.Tensor, cpu_packed: torch.Tensor, shape: tuple[int, int], scales: torch.Tensor,
                   codebook: Codebook, blocksize: int) -> torch.Tensor:
    """x [M, in] bf16 @ W.T for a 4-bit W in bitsandbytes' CPU layout with ``tile_major_scales``, x
    rounded to int8 per block of 64."""
    lib = native_library()
    assert lib is not None
    x = x.contiguous()
    rows, (out_features, in_features) = x.shape[0], shape
    out = torch.empty(rows, out_features, dtype=torch.bfloat16)
    check_status(lib.dsmoe_4bit_gemm(codebook.address, codebook.unit, blocksize, rows, out_features, in_features,
                                     x.data_ptr(), cpu_packed.data_ptr(), scales.data_ptr(), out.data_ptr()),
                 "4-bit matmul")
    return out


def int8_native_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                   out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x [M, in] bf16 @ (weight * scale[:, None]).T, x rounded to int8 per block of 64 (needs ``native_library``).

    ``out_dtype`` is bf16 (what the layers return) or fp32 (the kernel's own sums, which the tests check).
    """
    lib = native_library()
    assert lib is not None
    x = x.contiguous()
    rows, (out_features, in_features) = x.shape[0], weight.shape
    out = torch.empty(rows, out_features, dtype=out_dtype)
    check_status(lib.dsmoe_int8_gemv(rows, out_features, in_features, x.data_ptr(), weight.data_ptr(),
                                     scale.data_ptr(), out.data_ptr(), int(out_dtype == torch.float32)), "int8 matmul")
    return out


def bf16_native_mm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, in] bf16 @ weight [out, in] bf16 .T with fp32 sums, bf16 out, by ``dsmoe_bf16_matmul``
    (needs ``native_library`` and ``in`` a multiple of ``BF16_K_STEP``)."""
    lib = native_library()
    assert lib is not None
    x = x.contiguous()
    rows, (out_features, in_features) = x.shape[0], weight.shape
    out = torch.empty(rows, out_features, dtype=torch.bfloat16)
    check_status(lib.dsmoe_bf16_matmul(rows, out_features, in_features, x.data_ptr(), weight.data_ptr(),
                                       out.data_ptr()), "bf16 matmul")
    return out


def int8_weight_only_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """x [M, in] @ (weight * scale[:, None]).T with the scale applied in fp32 after the int8 matmul.

    ``_weight_int8pack_mm`` takes scales in x's dtype; a bf16 scale would round SCB/127 by up to
    2^-9, so it runs with unit scales and the exact fp32 scale multiplies its output.
    """
    out = torch._weight_int8pack_mm(x, weight, unit)
    return (out.float() * scale).to(x.dtype)
