"""Quantized linear layers in bitsandbytes' formats, and their transformers checkpoint layout.

The numbers are bitsandbytes' own: 4-bit weights are quantized by ``quantize_4bit`` (NF4/FP4
codebooks, blockwise absmax, optional double quantization of the absmax), 8-bit weights are
LLM.int8's row-wise absmax (``round(127 * w / SCB)``); dsmoe's own 6-bit blocks (quant/q6.py) serve
only lm_head. A faster in-memory layout may be built at
load (see ``kernels.py``) but the checkpoint tensors always come back in the standard layout.
"""

from __future__ import annotations

import abc
import ctypes as ct
import dataclasses
import functools
import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dsmoe.checkpoint.lazy import NATIVE_SCALES
from dsmoe.errors import CheckpointError, UsageError
from dsmoe.native.library import (ACT_BLOCK, BF16_K_STEP, DTYPE_BF16, DTYPE_F16, DTYPE_F32, MAX_QUANT_BLOCK, MLP_POINTERS,
                                  Q6_BLOCK_BYTES, check_status, native_library)
from dsmoe.quant import kernels
from dsmoe.quant.q6 import Q6_STEPS, dequantize_q6, q6_native_mm, quantize_q6, quantize_q6_native
from dsmoe.quant.spec import FOUR_BIT_TYPES, QuantSpec, spec_for
from dsmoe.quant.state import (FourBitState, NestedState, codebook, is_standard_codebook,
                               state_from_tensors)

_QS_PREFIX = "quant_state.bitsandbytes__"


class QuantLinear(nn.Module, abc.ABC):
    """Common ground: shapes, compute dtype, and buffers that follow device moves but not casts."""

    in_features: int
    out_features: int
    compute_dtype: torch.dtype

    def _apply(self, fn, recurse=True):
        # model.to(torch.float16) must not round absmax or scales: only follow the device.
        device = fn(torch.empty(0)).device
        if all(buf is None or buf.device == device for buf in self._buffers.values()):
            return self  # nothing moves: the runtime layout stands (rebuilding it was 1.5 s of a load)
        for name, buf in list(self._buffers.items()):
            if buf is not None:  # register_buffer tells decode plans (model/layer_plan.py) the weights moved
                self.register_buffer(name, buf.to(device), persistent=name not in self._non_persistent_buffers_set)
        self._on_device_change()
        return self

    def _on_device_change(self) -> None:
        """Rebuild whatever runtime layout depends on the device."""

    @abc.abstractmethod
    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Tensor suffixes (``weight``, ``weight.absmax``, ``SCB``, ...) -> CPU tensors."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # state_dict() gives transformers' layout, so a model with these layers saves like HF's.
        for suffix, tensor in self.checkpoint_tensors().items():
            destination[prefix + suffix] = tensor

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, compute_dtype={self.compute_dtype}"


class Linear4bit(QuantLinear):
    """y = x @ dequant(W).T for an NF4/FP4 weight; no bias (DeepSeekMoE's linears have none)."""

    # Buffers (register_buffer), declared so a type checker knows them as tensors, not submodules.
    weight: torch.Tensor
    absmax: torch.Tensor
    quant_map: torch.Tensor
    nested_absmax: torch.Tensor
    nested_quant_map: torch.Tensor
    runtime_absmax: torch.Tensor
    native_codebook: kernels.Codebook | None

    def __init__(self, packed: torch.Tensor, state, compute_dtype: torch.dtype, layout: str = "standard",
                 repack_in_place: bool = False, native_scales: torch.Tensor | None = None) -> None:
        """``layout`` names the layout ``packed`` is already in ("native": dsmoe's kernel layout, as an
        expert pack or a kernel-layout checkpoint stores it, so nothing is repacked); standard
        bitsandbytes nibbles by default. ``repack_in_place``: ``packed`` is this module's alone, so
        the repack to the kernel's layout may rewrite it rather than fill a copy
        (``kernels.pack_4bit``). ``native_scales``: the native kernels' scales as stored beside a
        native ``packed`` (``kernels.tile_major_scales`` of the absmax), used as they are."""
        super().__init__()
        out_features, in_features = (int(d) for d in state.shape)
        self.in_features, self.out_features = in_features, out_features
        self.shape = (out_features, in_features)
        self.compute_dtype = compute_dtype
        self.quant_type: str = state.quant_type
        self.blocksize: int = int(state.blocksize)
        self.stored_dtype: torch.dtype = state.dtype
        self.double_quant = bool(state.nested)
        self.register_buffer("weight", packed.reshape(-1, 1).contiguous() if layout == "standard" else packed,
                             persistent=False)
        self.register_buffer("absmax", state.absmax, persistent=False)
        self.register_buffer("quant_map", state.code, persistent=False)
        if self.double_quant:
            self.nested_offset = float(state.offset)
            self.nested_blocksize = int(state.state2.blocksize)
            self.nested_dtype: torch.dtype = state.state2.dtype
            self.register_buffer("nested_absmax", state.state2.absmax, persistent=False)
            self.register_buffer("nested_quant_map", state.state2.code, persistent=False)
        self.layout = layout
        self._stored_scales = native_scales if layout == "native" else None
        self._on_device_change(repack_in_place)
        self._stored_scales = None

    def _quant_state(self):
        """The bitsandbytes QuantState of the stored (standard) form."""
        from bitsandbytes.functional import QuantState

        nested = None
        offset = None
        if self.double_quant:
            nested = QuantState(absmax=self.nested_absmax, code=self.nested_quant_map,
                                blocksize=self.nested_blocksize, dtype=self.nested_dtype)
            offset = torch.tensor(self.nested_offset, device=self.absmax.device)
        return QuantState(absmax=self.absmax, shape=torch.Size(self.shape),
                          code=self.quant_map, blocksize=self.blocksize, quant_type=self.quant_type,
                          dtype=self.stored_dtype, offset=offset, state2=nested)

    def _state(self) -> FourBitState:
        """The stored form's state, without bitsandbytes (``_quant_state`` is its QuantState)."""
        nested = None
        offset = None
        if self.double_quant:
            nested = NestedState(self.nested_absmax, self.nested_quant_map, self.nested_blocksize, self.nested_dtype)
            offset = torch.tensor(self.nested_offset)
        return FourBitState(shape=torch.Size(self.shape), quant_type=self.quant_type, blocksize=self.blocksize,
                            dtype=self.stored_dtype, absmax=self.absmax, code=self.quant_map, offset=offset,
                            state2=nested)

    def _absmax_f32(self) -> torch.Tensor:
        if not self.double_quant:
            return self.absmax.float()
        from bitsandbytes.functional import dequantize_blockwise

        state = self._quant_state()
        return (dequantize_blockwise(self.absmax, state.state2) + state.offset).float()

    def _on_device_change(self, repack_in_place: bool = False) -> None:
        device = self.weight.device
        packable = (device.type == "cpu" and self.compute_dtype == torch.bfloat16
                    and kernels.can_pack_for_cpu(self.out_features, self.in_features, self.blocksize))
        # dsmoe's kernel (AVX512-VNNI or AVX2): whole 64-wide activation blocks, each under one absmax.
        native = (packable and self.in_features % ACT_BLOCK == 0
                  and self.blocksize % ACT_BLOCK == 0 and kernels.native_4bit_available())
        # bitsandbytes' kernel needs AVX512-BF16; asked only without ours (importing it costs ~2 s).
        bnb_cpu = packable and not native and kernels.cpu_4bit_kernel_available()
        want = "native" if native else "cpu" if bnb_cpu else "standard"
        if want != self.layout:
            n, k = self.out_features, self.in_features
            own = repack_in_place and self.layout == "standard"
            if self.layout != "standard":
                standard, own = kernels.unpack_4bit(self.weight, self.layout, n, k), True  # a fresh tensor
            else:
                standard = self.weight
            self.weight = standard if want == "standard" else kernels.pack_4bit(standard, want, n, k, in_place=own)
            self.layout = want
        self.native_codebook = kernels.native_codebook(self.quant_type) if native else None
        self._cpu_entry = kernels.cpu_4bit_entry(self.quant_type) if self.layout == "cpu" else None
        self.register_buffer("runtime_absmax", self._runtime_scales(), persistent=False)

    def _runtime_scales(self) -> torch.Tensor:
        """fp32 for the dequantize path; bf16 for the CPU kernels, tile-major for dsmoe's,
        [in/blocksize, out] for bitsandbytes'."""
        if self.native_codebook is not None and self._stored_scales is not None:
            return self._stored_scales
        absmax = self._absmax_f32()
        if self.native_codebook is not None:
            return kernels.tile_major_scales(absmax, self.out_features, self.in_features, self.blocksize)
        if self.layout == "cpu":
            return absmax.view(self.out_features, -1).t().to(torch.bfloat16).contiguous()
        return absmax

    def kernel(self, rows: int) -> str:
        """The kernel a call with ``rows`` input rows runs."""
        if self.layout != "standard":
            return "4bit_native" if self.layout == "native" else "bnb_cpu_4bit"
        if self.weight.device.type == "cuda":
            return "bnb_matmul_4bit"
        return "dequant_matmul"

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as bitsandbytes' ``dequantize_4bit`` gives it, [out, in]."""
        weight = self.weight
        if self.layout != "standard":
            weight = kernels.unpack_4bit(weight, self.layout, self.out_features, self.in_features)
        absmax = self.runtime_absmax if self.layout == "standard" else self._absmax_f32()
        shape = self.shape
        if weight.device.type == "cpu" and self.in_features % self.blocksize:
            return kernels.dequantize_4bit_lookup(weight, absmax, self.quant_map, self.blocksize, shape, dtype)
        import bitsandbytes  # noqa: F401  (its import registers torch.ops.bitsandbytes; loads skip it)

        return torch.ops.bitsandbytes.dequantize_4bit.default(
            weight, absmax, self.blocksize, self.quant_type, list(shape), dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout != "standard" and x.dtype == torch.bfloat16:
            # The hot path (decode runs ~5 per layer per token): no dispatch or casts around the C call.
            flat = x.reshape(-1, self.in_features)
            if self.native_codebook is not None:
                out = kernels.native_4bit_mm(flat, self.weight, self.shape, self.runtime_absmax, self.native_codebook,
                                             self.blocksize)
            else:
                out = kernels.gemv_4bit_cpu(flat, self.weight, self.shape, self.runtime_absmax, self.quant_map,
                                            self.blocksize, self._cpu_entry)
            return out.view(*x.shape[:-1], self.out_features)
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features).to(self.compute_dtype)
        kernel = self.kernel(flat.shape[0])
        if kernel == "4bit_native":
            codebook = self.native_codebook
            assert codebook is not None  # kernel() picks the native one only with its codebook
            out = kernels.native_4bit_mm(flat, self.weight, self.shape, self.runtime_absmax, codebook, self.blocksize)
        elif kernel == "bnb_cpu_4bit":
            out = kernels.gemv_4bit_cpu(flat, self.weight, self.shape, self.runtime_absmax, self.quant_map,
                                        self.blocksize, self._cpu_entry)
        elif kernel == "bnb_matmul_4bit":
            import bitsandbytes as bnb

            out = bnb.matmul_4bit(flat, self.weight, quant_state=self._quant_state())
        else:
            out = F.linear(flat, self.dequantized(self.compute_dtype))
        return out.to(x.dtype).reshape(*lead, self.out_features)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        weight = self.weight
        if self.layout != "standard":
            weight = kernels.unpack_4bit(weight, self.layout, self.out_features, self.in_features)
        tensors = {"weight": weight}
        for key, value in self._state().as_tensors().items():
            tensors["weight." + key] = value
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


class Linear8bit(QuantLinear):
    """y = x @ (W_int8 * SCB / 127).T: LLM.int8 weights (row-wise absmax), no outlier split."""

    weight: torch.Tensor  # buffers, as Linear4bit's
    SCB: torch.Tensor
    scale: torch.Tensor
    unit: torch.Tensor

    def __init__(self, weight: torch.Tensor, scb: torch.Tensor, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = (int(d) for d in weight.shape)
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", weight.contiguous(), persistent=False)
        self.register_buffer("SCB", scb.float().contiguous(), persistent=False)
        self._on_device_change()

    def _on_device_change(self) -> None:
        device = self.weight.device
        self.register_buffer("scale", self.SCB / 127.0, persistent=False)
        self.register_buffer("unit", torch.ones(self.out_features, dtype=self.compute_dtype, device=device),
                             persistent=False)
        self.native = (device.type == "cpu" and self.compute_dtype == torch.bfloat16
                       and self.in_features % ACT_BLOCK == 0 and native_library() is not None)

    def kernel(self, rows: int) -> str:
        if self.weight.device.type == "cuda":
            return "bnb_matmul_int8"
        if self.compute_dtype != torch.bfloat16:
            return "int8pack"
        if rows >= kernels.INT_MM_MIN_ROWS and kernels.int_mm_for_many_rows():
            return "int_mm_dynamic"
        return "int8_native" if self.native else "int8pack"

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features).to(self.compute_dtype)
        kernel = self.kernel(flat.shape[0])
        if kernel == "int8_native":
            out = kernels.int8_native_mm(flat, self.weight, self.scale)
        elif kernel == "int8pack":
            out = kernels.int8_weight_only_mm(flat, self.weight, self.scale, self.unit)
        elif kernel == "int_mm_dynamic":
            out = kernels.int8_dynamic_mm(flat, self.weight.t(), self.scale)
        else:
            import bitsandbytes as bnb

            state = bnb.MatmulLtState()
            state.has_fp16_weights = False
            state.CB, state.SCB = self.weight, self.SCB
            out = bnb.matmul(flat, self.weight, state=state)
        return out.to(x.dtype).reshape(*lead, self.out_features)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "weight": self.weight.detach().cpu().contiguous(),
            "SCB": self.SCB.detach().cpu().contiguous(),
            # transformers writes the layout tag; 0 is "row", the only one it still reads.
            "weight_format": torch.tensor(0, dtype=torch.uint8),
        }


class Linear6bit(QuantLinear):
    """y = x @ dequant(W).T for dsmoe's 6-bit format (quant/q6.py): the lm_head of 4-bit runs.

    Stored as ``weight`` (the packed codes, uint8 [out, in / 64 * 48]) and ``weight.q6_steps``
    (fp16 [out, in / 64]); the native kernel reads them as they are.
    """

    weight: torch.Tensor  # buffers, as Linear4bit's
    steps: torch.Tensor

    def __init__(self, packed: torch.Tensor, steps: torch.Tensor, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, blocks = (int(d) for d in steps.shape)
        self.in_features = blocks * ACT_BLOCK
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", packed.contiguous(), persistent=False)
        self.register_buffer("steps", steps.contiguous(), persistent=False)
        self._on_device_change()

    def _on_device_change(self) -> None:
        self.native = (self.weight.device.type == "cpu" and self.compute_dtype == torch.bfloat16
                       and native_library() is not None)

    def kernel(self, rows: int) -> str:
        return "q6_native" if self.native else "dequant_matmul"

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_q6(self.weight, self.steps, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features).to(self.compute_dtype)
        lib = native_library() if self.native else None
        if lib is not None:
            out = q6_native_mm(lib, flat, self.weight, self.steps)
        else:
            out = F.linear(flat, self.dequantized(self.compute_dtype))
        return out.to(x.dtype).reshape(*lead, self.out_features)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight.detach().cpu().contiguous(),
                f"weight.{Q6_STEPS}": self.steps.detach().cpu().contiguous()}


class Bf16Linear(nn.Linear):
    """An ``nn.Linear`` of bf16 weights on the CPU whose matmul is dsmoe's (native/bf16.c: fp32 sums
    of exact products, bf16 out, as ``F.linear`` up to the sums' order). PyTorch's CPU bf16 matmul
    ran at ~5 GMAC/s a thread for every shape on an AVX2 machine: 4-6x this kernel's time at 64
    rows, 1.3-2.9x at one (docs/PERFORMANCE.md, "bf16 matmul: dsmoe's kernel instead of
    PyTorch's"). Inputs the kernel does not take (another dtype or device, autograd on the input or
    the weight, no rows) go to ``F.linear``.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = (int(d) for d in weight.shape)
        # The same parameter where it is one already: a tied lm_head stays the embedding's.
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (x.dtype == self.weight.dtype == torch.bfloat16 and x.device.type == self.weight.device.type == "cpu"
                and x.numel() > 0 and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return F.linear(x, self.weight)
        lead = x.shape[:-1]
        return kernels.bf16_native_mm(x.reshape(-1, self.in_features), self.weight).reshape(*lead, self.out_features)


def float_linear(weight: torch.Tensor) -> nn.Linear:
    """A bias-free linear layer holding ``weight``: a ``Bf16Linear`` where dsmoe's kernel takes it (bf16 on
    the CPU, the library built, the input width a multiple of ``BF16_K_STEP``), else an ``nn.Linear``."""
    if (weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and weight.dim() == 2 and weight.is_contiguous()
            and weight.shape[1] % BF16_K_STEP == 0 and native_library() is not None):
        return Bf16Linear(weight)
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


def native_bf16_linears(model: nn.Module) -> int:
    """Replace, in place, each bias-free ``nn.Linear`` that ``float_linear`` gives a ``Bf16Linear`` for,
    keeping its weight tensor; returns how many were replaced."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or module.bias is not None:
            continue
        linear = float_linear(module.weight)
        if isinstance(linear, Bf16Linear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
            replaced += 1
    return replaced


@dataclasses.dataclass(frozen=True)
class NativeWeights:
    """Layers of one format as the native decode kernels take them.

    ``table`` and ``unit`` are the 4-bit codebook's (``kernels.Codebook``), table None for 8-bit;
    ``tensors`` holds each layer's weight and scale in order, and keeps ``addresses`` valid.
    """

    table: int | None
    unit: float
    blocksize: int
    tensors: tuple[torch.Tensor, ...]

    @property
    def addresses(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in self.tensors)


def native_weights(layers: Sequence[nn.Module]) -> NativeWeights | None:
    """The layers for the native kernels, or None unless all are of one format those take: 8-bit
    with the native int8 kernel, or 4-bit with one codebook and blocksize on the native 4-bit kernel."""
    eight_bit = [m for m in layers if isinstance(m, Linear8bit) and m.native]
    if len(eight_bit) == len(layers):
        return NativeWeights(None, 0.0, 0, tuple(t for m in eight_bit for t in (m.weight, m.scale)))
    four_bit = [m for m in layers if isinstance(m, Linear4bit) and m.native_codebook is not None]
    if len(four_bit) != len(layers):
        return None
    first = four_bit[0]
    codebook = first.native_codebook
    assert codebook is not None
    if not all(m.native_codebook is codebook and m.blocksize == first.blocksize for m in four_bit):
        return None
    tensors = tuple(t for m in four_bit for t in (m.weight, m.runtime_absmax))
    return NativeWeights(codebook.address, codebook.unit, first.blocksize, tensors)


class SwiGLUKernel:
    """down(silu(gate(x)) * up(x)) for one bf16 token as one native call, bound to three layers.

    Decode runs ~7 of these per layer, so the call's constant arguments (sizes, weight addresses)
    are converted once here; the owner rebuilds it when the layers are replaced or moved.
    """

    def __init__(self, hidden: int, inter: int, weights: NativeWeights) -> None:
        self.hidden, self.inter, self.weights = hidden, inter, weights
        self.table, self.unit, self.blocksize = weights.table, weights.unit, weights.blocksize
        lib = native_library()
        assert lib is not None
        if weights.table is None:
            self.function = lib.dsmoe_int8_mlp
            self.head: tuple[int | float | None, ...] = (hidden, inter)
        else:
            self.function = lib.dsmoe_4bit_mlp
            self.head = (self.table, self.unit, self.blocksize, hidden, inter)
        self.addresses = weights.addresses
        # Kernels of the same kind can run together in ``accumulate_experts``.
        self.kind = (self.table, self.unit, self.blocksize, hidden, inter)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape, dtype=torch.bfloat16)
        status = self.function(*self.head, x.contiguous().data_ptr(), *self.addresses, out.data_ptr())
        if status != 0:
            raise RuntimeError(f"native MLP kernel failed with status {status}")
        return out


def accumulate_experts(experts: Sequence[SwiGLUKernel], mix: Sequence[float], x: torch.Tensor,
                       out: torch.Tensor) -> None:
    """``out += expert(x) * weight`` for each expert and weight in order, in one native call.

    The routed experts of a decode step (6 in the 16B model), all of one kind (``SwiGLUKernel.kind``);
    ``mix`` are the routing weights already rounded to bf16. The roundings are PyTorch's, so the
    result is the per-expert loop's, bit for bit.
    """
    lib = native_library()
    assert lib is not None
    first = experts[0]
    pointers = (ct.c_void_p * (MLP_POINTERS * len(experts)))(*(a for e in experts for a in e.addresses))
    weights = (ct.c_float * len(mix))(*mix)
    status = lib.dsmoe_experts(first.table, first.unit, first.blocksize, len(experts), first.hidden, first.inter,
                               x.contiguous().data_ptr(), pointers, weights, out.data_ptr())
    if status != 0:
        raise RuntimeError(f"native experts kernel failed with status {status}")


NATIVE_ROWS_KERNELS = frozenset({"4bit_native", "int8_native"})
"""The kernels (``QuantLinear.kernel``) whose numbers ``route_experts`` reproduces for a layer's rows."""


def route_experts(experts: Sequence[SwiGLUKernel], counts: Sequence[int], tokens: torch.Tensor, mix: torch.Tensor,
                  x: torch.Tensor, out: torch.Tensor) -> None:
    """MoE.route's per-expert loop over many tokens (prefill) in two native calls, bit for bit.

    ``experts`` (all of one kind, ascending ids) get ``counts`` tokens each (each at least one):
    ``tokens`` [sum(counts)] int64 holds them expert after expert, ``mix`` [sum(counts)] fp32 their
    routing weights already rounded to bf16. ``out`` [tokens, hidden] bf16 gets
    ``out.index_add_(0, tokens, expert(x[tokens]) * weight)`` for each expert in order. Between the
    calls PyTorch computes ``silu(gate) * up`` as the layers' loop does, in bf16, so the result is
    the loop's; experts with one token take the one-token path in C, as the loop's would
    (``MLP.forward``). One call per half rather than ~3 per expert: at 64 tokens an expert gets ~6
    rows, too few for the per-call work (Python, quantizing x, a thread team) to hide.
    """
    lib = native_library()
    assert lib is not None
    first = experts[0]
    starts = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int64)
    total = int(starts[-1])
    pointers = (ct.c_void_p * (MLP_POINTERS * len(experts)))(*(a for e in experts for a in e.addresses))
    head = (first.table, first.unit, first.blocksize, first.hidden, first.inter, len(experts), pointers,
            starts.data_ptr(), tokens.data_ptr())
    gate = torch.empty(total, first.inter, dtype=torch.bfloat16)
    up = torch.empty_like(gate)
    single = torch.empty(total, first.inter, dtype=torch.float32)  # rows of one-token experts only
    check_status(lib.dsmoe_moe_up(*head, x.contiguous().data_ptr(), gate.data_ptr(), up.data_ptr(), single.data_ptr()),
                 "routed experts (gate, up)")
    h = F.silu(gate) * up
    check_status(lib.dsmoe_moe_down(*head, mix.data_ptr(), h.data_ptr(), single.data_ptr(), out.data_ptr()),
                 "routed experts (down)")


def swiglu_kernel(gate: nn.Module, up: nn.Module, down: nn.Module) -> SwiGLUKernel | None:
    """The one-call MLP for these layers, or None where none applies (see ``native_weights``)."""
    weights = native_weights((gate, up, down))
    if weights is None:
        return None
    return SwiGLUKernel(down.out_features, gate.out_features, weights)  # type: ignore[arg-type]  # native_weights took them: quantized linears


def quantize_int8(weight: torch.Tensor, rows_per_step: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8 row-wise absmax: (int8 [out, in], SCB fp32 [out]); an all-zero row stays zero.

    Rows go in steps so the fp32 temporaries stay small: for lm_head (102400 x 2048) in one piece
    they were ~2.5 GB on top of the model at the end of a load.
    """
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scb = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], rows_per_step):
        w = weight[start : start + rows_per_step].float()
        step_scb = w.abs().amax(dim=1)
        scaled = torch.round(w * (127.0 / step_scb.clamp(min=torch.finfo(torch.float32).tiny)).unsqueeze(1))
        q[start : start + rows_per_step] = scaled.clamp_(-127, 127)
        scb[start : start + rows_per_step] = step_scb
    return q, scb


_NATIVE_DTYPES = {torch.float32: DTYPE_F32, torch.bfloat16: DTYPE_BF16, torch.float16: DTYPE_F16}


def _native_quantizer(weight: torch.Tensor) -> ct.CDLL | None:
    """The native library where it can quantize ``weight`` (a CPU tensor of a type it reads), else None."""
    if weight.device.type != "cpu" or weight.dtype not in _NATIVE_DTYPES:
        return None
    return native_library()


@functools.cache
def codebook_buckets(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4-bit codebook as bitsandbytes' quantize_4bit searches it: the midpoints between its
    sorted entries (fp32) and the stored code of each bucket between them (uint8)."""
    code = codebook(quant_type)
    order = torch.argsort(code)
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2
    return midpoints.contiguous(), order.to(torch.uint8).contiguous()


def quantize_4bit_native(lib: ct.CDLL, weight: torch.Tensor, blocksize: int,
                         quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' ``quantize_4bit`` output without the statistics' compression: packed
    [ceil(n / 2), 1] uint8 and absmax [blocks] fp32, bit for bit, from the native quantizer."""
    source = weight.contiguous()
    n = source.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    bounds, codes = codebook_buckets(quant_type)
    check_status(lib.dsmoe_quantize_4bit(source.data_ptr(), _NATIVE_DTYPES[source.dtype], n, blocksize,
                                         bounds.data_ptr(), codes.data_ptr(), packed.data_ptr(), absmax.data_ptr()),
                 "4-bit quantizer")
    return packed, absmax


def quantize_int8_native(lib: ct.CDLL, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_int8``'s output, bit for bit, from the native quantizer."""
    source = weight.contiguous()
    q = torch.empty(source.shape, dtype=torch.int8)
    scb = torch.empty(source.shape[0], dtype=torch.float32)
    check_status(lib.dsmoe_quantize_int8(source.data_ptr(), _NATIVE_DTYPES[source.dtype], source.shape[0],
                                         source.shape[1], q.data_ptr(), scb.data_ptr()), "int8 quantizer")
    return q, scb


def _quant_state_of(absmax: torch.Tensor, weight: torch.Tensor, spec: QuantSpec) -> FourBitState:
    """The state bitsandbytes' ``quantize_4bit`` builds around these absmax; with double
    quantization, its own ``quantize_blockwise`` compresses them (they are 1/blocksize of the weight)."""
    code = codebook(spec.quant_type).to(weight.device)
    if not spec.double_quant:
        return FourBitState(shape=weight.shape, quant_type=spec.quant_type, blocksize=spec.blocksize,
                            dtype=weight.dtype, absmax=absmax, code=code)
    from bitsandbytes.functional import quantize_blockwise

    offset = absmax.mean()
    qabsmax, state2 = quantize_blockwise(absmax - offset, blocksize=256)
    nested = NestedState(state2.absmax, state2.code, int(state2.blocksize), state2.dtype)
    return FourBitState(shape=weight.shape, quant_type=spec.quant_type, blocksize=spec.blocksize, dtype=weight.dtype,
                        absmax=qabsmax, code=code, offset=offset, state2=nested)


def quantize_linear(weight: torch.Tensor, spec: QuantSpec, compute_dtype: torch.dtype = torch.bfloat16) -> QuantLinear:
    """Quantize one [out, in] weight into a module that computes in ``compute_dtype``.

    The native quantizer (both threads, the same bytes) where the library is built; bitsandbytes'
    and PyTorch's code otherwise, which is ~10x slower and what made quantizing while loading wait.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise UsageError(f"quantize_linear needs a 2-D float weight, got {tuple(weight.shape)} {weight.dtype}")
    lib = _native_quantizer(weight)
    if spec.bits == 6:
        packed, steps = quantize_q6(weight) if lib is None else quantize_q6_native(lib, weight)
        return Linear6bit(packed, steps, compute_dtype)
    if spec.bits == 8:
        q, scb = quantize_int8(weight) if lib is None else quantize_int8_native(lib, weight)
        return Linear8bit(q, scb, compute_dtype)
    source = weight if weight.dtype in (torch.float32, torch.bfloat16, torch.float16) else weight.float()
    if lib is not None and spec.blocksize <= MAX_QUANT_BLOCK:
        packed, absmax = quantize_4bit_native(lib, source, spec.blocksize, spec.quant_type)
        return Linear4bit(packed, _quant_state_of(absmax, source, spec), compute_dtype, repack_in_place=True)
    from bitsandbytes.functional import quantize_4bit

    packed, state = quantize_4bit(source.contiguous(), blocksize=spec.blocksize,
                                  compress_statistics=spec.double_quant, quant_type=spec.quant_type)
    return Linear4bit(packed, state, compute_dtype, repack_in_place=True)


def quantized_tensors(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """``prefix.weight``, ``prefix.weight.absmax``, ... in transformers' bitsandbytes layout (CPU)."""
    if not isinstance(module, QuantLinear):
        raise UsageError(f"{prefix}: not a quantized linear ({type(module).__name__})")
    return {f"{prefix}.{suffix}": tensor for suffix, tensor in module.checkpoint_tensors().items()}


def linear_from_tensors(tensors: dict[str, torch.Tensor], prefix: str, spec: QuantSpec,
                        compute_dtype: torch.dtype, own: bool = False) -> QuantLinear:
    """The module stored under ``prefix`` (written by dsmoe or transformers), without re-quantizing.

    The tensors themselves say which format they hold (``SCB`` for 8-bit, a packed quant state for
    4-bit); ``spec`` is the checkpoint's declared format, which they must agree with. ``own``: the
    tensors were read for this call alone, so the module keeps them (a 4-bit weight is repacked in
    place) instead of copies; the caller must not use them afterwards.
    """
    weight = tensors.get(f"{prefix}.weight")
    if weight is None:
        raise CheckpointError(f"tensor {prefix}.weight is missing")
    if f"{prefix}.SCB" in tensors:
        return _int8_from_tensors(tensors, prefix, weight, compute_dtype, own)
    if f"{prefix}.weight.{Q6_STEPS}" in tensors:
        return _q6_from_tensors(tensors[f"{prefix}.weight.{Q6_STEPS}"], prefix, weight, compute_dtype, own)
    if spec.bits == 8:
        raise CheckpointError(f"{prefix}: the checkpoint declares 8-bit but {prefix}.SCB is missing")
    return _4bit_from_tensors(tensors, prefix, weight, compute_dtype, own)


def _int8_from_tensors(tensors: dict[str, torch.Tensor], prefix: str, weight: torch.Tensor,
                       compute_dtype: torch.dtype, own: bool) -> Linear8bit:
    scb = tensors[f"{prefix}.SCB"]
    layout = tensors.get(f"{prefix}.weight_format")
    if layout is not None and int(layout.reshape(-1)[0]) != 0:
        raise CheckpointError(f"{prefix}.weight_format is {int(layout.reshape(-1)[0])}: only row-major (0) is supported")
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise CheckpointError(f"{prefix}.weight: expected a 2-D int8 tensor, got {weight.dtype} {list(weight.shape)}")
    if scb.dim() != 1 or scb.shape[0] != weight.shape[0] or not scb.is_floating_point():
        raise CheckpointError(f"{prefix}.SCB: expected {weight.shape[0]} floats, got {scb.dtype} {list(scb.shape)}")
    scb = scb.float()
    return Linear8bit(weight if own else weight.clone(), scb if own else scb.clone(), compute_dtype)


def _q6_from_tensors(steps: torch.Tensor, prefix: str, weight: torch.Tensor, compute_dtype: torch.dtype,
                     own: bool) -> Linear6bit:
    if steps.dtype != torch.float16 or steps.dim() != 2:
        raise CheckpointError(f"{prefix}.weight.{Q6_STEPS}: expected a 2-D fp16 tensor, got {steps.dtype} {list(steps.shape)}")
    expected = [steps.shape[0], steps.shape[1] * Q6_BLOCK_BYTES]
    if weight.dtype != torch.uint8 or list(weight.shape) != expected:
        raise CheckpointError(f"{prefix}.weight: expected q6 codes uint8 {expected}, got {weight.dtype} {list(weight.shape)}")
    return Linear6bit(weight if own else weight.clone(), steps if own else steps.clone(), compute_dtype)


def _4bit_from_tensors(tensors: dict[str, torch.Tensor], prefix: str, weight: torch.Tensor,
                       compute_dtype: torch.dtype, own: bool) -> Linear4bit:
    base = f"{prefix}.weight."
    parts = {name[len(base):]: t for name, t in tensors.items() if name.startswith(base)}
    native_scales = parts.pop(NATIVE_SCALES, None)
    packed_states = [k for k in parts if k.startswith(_QS_PREFIX)]
    if len(packed_states) != 1:
        raise CheckpointError(f"{prefix}: expected one {base}{_QS_PREFIX}<nf4|fp4> tensor, found {len(packed_states)}")
    quant_type = packed_states[0][len(_QS_PREFIX):]
    if quant_type not in FOUR_BIT_TYPES:
        raise CheckpointError(f"{prefix}: unsupported 4-bit type {quant_type!r}")
    try:
        state = state_from_tensors(parts if own else {k: v.clone() for k, v in parts.items()})
    except ValueError as exc:
        raise CheckpointError(f"{prefix}: unreadable 4-bit quant state ({exc})") from None
    if state.shape is None or len(state.shape) != 2:
        raise CheckpointError(f"{prefix}: 4-bit weight must be 2-D, quant state says {state.shape}")
    out_features, in_features = (int(d) for d in state.shape)
    numel = out_features * in_features
    if native_scales is not None:
        return _native_4bit(prefix, weight, state, native_scales, compute_dtype)
    if weight.dtype != torch.uint8 or weight.numel() != (numel + 1) // 2:
        raise CheckpointError(f"{prefix}.weight: expected {(numel + 1) // 2} packed uint8 values, "
                              f"got {weight.dtype} {list(weight.shape)}")
    blocks = -(-numel // state.blocksize)
    if state.absmax.numel() != blocks:
        raise CheckpointError(f"{prefix}.weight.absmax: expected {blocks} values, got {state.absmax.numel()}")
    if not is_standard_codebook(state.code, state.quant_type):
        raise CheckpointError(f"{prefix}.weight.quant_map is not the standard {state.quant_type} codebook")
    if in_features % 2:
        raise CheckpointError(f"{prefix}: odd input width {in_features} is not supported")
    return Linear4bit(weight if own else weight.clone(), state, compute_dtype, repack_in_place=True)


def _native_4bit(prefix: str, weight: torch.Tensor, state: FourBitState, scales: torch.Tensor,
                 compute_dtype: torch.dtype) -> Linear4bit:
    """A 4-bit weight stored in the kernels' layout with its kernel scales (a kernel-layout
    checkpoint, ``native_tensors``): used as it is, after the checks the standard layout gets."""
    n, k = (int(d) for d in state.shape)
    if not (kernels.can_pack_for_cpu(n, k, state.blocksize) and k % ACT_BLOCK == 0 and state.blocksize % ACT_BLOCK == 0):
        raise CheckpointError(f"{prefix}.weight: a {n}x{k} weight with blocksize {state.blocksize} "
                              "cannot be in the kernels' layout")
    if weight.dtype != torch.uint8 or tuple(weight.shape) != (n, k // 2):
        raise CheckpointError(f"{prefix}.weight: the kernels' layout is uint8 [{n}, {k // 2}], "
                              f"got {weight.dtype} {list(weight.shape)}")
    if scales.dtype != torch.bfloat16 or scales.numel() != n * k // state.blocksize:
        raise CheckpointError(f"{prefix}.weight.{NATIVE_SCALES}: expected {n * k // state.blocksize} bf16 values, "
                              f"got {scales.dtype} {list(scales.shape)}")
    if state.absmax.numel() != n * k // state.blocksize:
        raise CheckpointError(f"{prefix}.weight.absmax: expected {n * k // state.blocksize} values, "
                              f"got {state.absmax.numel()}")
    if not is_standard_codebook(state.code, state.quant_type):
        raise CheckpointError(f"{prefix}.weight.quant_map is not the standard {state.quant_type} codebook")
    return Linear4bit(weight, state, compute_dtype, layout="native", native_scales=scales.reshape(-1))


def native_tensors(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """``quantized_tensors`` with a 4-bit weight in the kernels' layout, as it runs, and its kernel
    scales beside it (``X.weight.native_scales``): what a kernel-layout checkpoint stores, so that a
    load maps it instead of repacking. Other modules, and 4-bit ones not in that layout, as
    ``quantized_tensors`` gives them."""
    if not (isinstance(module, Linear4bit) and module.layout == "native" and not module.double_quant):
        return quantized_tensors(module, prefix)
    tensors = {f"{prefix}.weight": module.weight.contiguous(),
               f"{prefix}.weight.{NATIVE_SCALES}": module.runtime_absmax.contiguous()}
    tensors.update({f"{prefix}.weight.{key}": value for key, value in module._state().as_tensors().items()})
    return tensors


def quantize_model(model: nn.Module, spec: QuantSpec, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace, in place, each ``nn.Linear`` whose ``name + '.weight'`` the policy quantizes.

    Returns how many layers were replaced. For loading, quantizing each weight as it is read keeps
    peak memory lower; this is for a model that is already in memory.
    """
    replaced = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        layer_spec = spec_for(f"{name}.weight", spec)
        if layer_spec is None:
            continue
        if module.bias is not None:
            raise UsageError(f"{name}: linears with a bias are not supported")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, quantize_linear(module.weight.detach(), layer_spec, compute_dtype))
        replaced += 1
    return replaced
