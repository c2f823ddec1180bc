"""Build the model from a checkpoint, tensor by tensor, so peak memory stays near the model's size.

The modules are created on the meta device (no memory), then each weight is read from its shard
(a window ahead, on a reader thread; a 4-bit weight in the kernels' layout is mapped instead),
checked, converted (or quantized) and put in place, so only the window is held beside the model.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from dsmoe.errors import CheckpointError, UsageError
from dsmoe.checkpoint.lazy import EMBEDDING, NATIVE_SCALES, mapped_lazily
from dsmoe.checkpoint.reader import Checkpoint, one_thread_for_the_reader, read_ahead
from dsmoe.model.deepseek import DeepseekForCausalLM
from dsmoe.model.layer_plan import building_detached
from dsmoe.checkpoint.memory import ReleaseEvery, release_freed_memory
from dsmoe.quant import (Linear6bit, QuantSpec, linear_from_tensors, native_bf16_linears, quantize_linear, spec_for,
                         spec_from_config)
from dsmoe.quant.spec import LM_HEAD, LM_HEAD_SPECS, lm_head_format
from dsmoe.quant.q6 import Q6_STEPS

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
          "fp16": torch.float16, "float16": torch.float16}

LoadProgress = Callable[[int, int], None]
"""Called as ``progress(tensors_done, tensors_total)`` while loading."""


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    try:
        return DTYPES[value.lower()]
    except KeyError:
        raise UsageError(f"unknown dtype {value!r} (choose bf16, fp16 or fp32)") from None


def load_model(
    checkpoint: Checkpoint,
    dtype: str | torch.dtype = torch.bfloat16,
    bits: int | None = None,
    quant_type: str | None = None,
    double_quant: bool = False,
    quantize_lm_head: bool | None = None,
    lm_head: str | None = None,
    device: str | torch.device = "cpu",
    progress: LoadProgress | None = None,
    skip_routed_experts: bool = False,
    skip_embedding: bool = False,
    map_weights: bool = True,
) -> DeepseekForCausalLM:
    """The model of an opened checkpoint (``dsmoe.load`` opens it and adds the tokenizer).

    ``bits`` 4 or 8 quantizes the linear layers while loading; a checkpoint that is already
    quantized is read as it is. lm_head is quantized as ``lm_head_format`` says (``lm_head``, "int8"
    or "q6", asks for a format): by default q6 beside 4-bit weights and int8 beside 8-bit ones, a
    stored checkpoint's float lm_head included; a stored quantized lm_head is read as it is.
    ``skip_routed_experts`` leaves the routed experts unread, on the meta device, for an expert
    store to own (see dsmoe.offload); ``skip_embedding`` leaves the embedding table unread, for a
    ``RowEmbedding`` that reads its rows from the file. ``map_weights`` False reads even the weights
    a load would map (``_kept_as_stored``) into memory of the process's own: an offloaded run is
    short of memory, and mapped file pages are what the kernel reclaims first under pressure (a
    memory cgroup counts them), so every token would read its resident weights from disk again.
    """
    compute_dtype = parse_dtype(dtype)
    device = torch.device(device)
    stored_spec = None
    if checkpoint.config.quantization_config is not None:
        stored_spec = spec_from_config(checkpoint.config.quantization_config)
    body_bits = stored_spec.bits if stored_spec is not None else bits if bits in (4, 8) else None
    head_format = lm_head_format(quantize_lm_head, lm_head, body_bits)
    spec = _quant_spec(checkpoint, bits, quant_type, double_quant, head_format)
    # A model being built is in no layer plan yet, so registering its ~10,000 modules and tensors
    # need not make every plan stale one by one (10,369 calls, 0.15 s of an 8-layer load).
    with torch.device("meta"), _WithoutRandomInit(), building_detached():
        model = DeepseekForCausalLM(checkpoint.config)
    model.eval().requires_grad_(False)

    linear_names = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    stored_groups = _group_by_module(checkpoint.tensor_names()) if stored_spec is not None else {}
    params = [name for name, _ in model.named_parameters()
              if not (skip_routed_experts and ".mlp.experts." in name) and not (skip_embedding and name == EMBEDDING)]
    stored = [stored_spec is not None and name.rpartition(".")[0] in linear_names and _is_quantized_in(checkpoint, name)
              for name in params]
    sources = [stored_groups[name.rpartition(".")[0]] if quantized else [_source_of(checkpoint, name)]
               for name, quantized in zip(params, stored)]
    mapped = frozenset(n for group, quantized in zip(sources, stored) if map_weights
                       for n in _kept_as_stored(group, quantized, device))
    # A user's own float checkpoint is read, never mapped: a file rewritten under a mapping takes the
    # process down (a cache entry or a `dsmoe quantize` output is written once).
    lazy = frozenset(mapped_lazily(checkpoint.tensor_names())
                     if map_weights and stored_spec is not None and device.type == "cpu" else ())
    with one_thread_for_the_reader(), building_detached():
        tensors = read_ahead(checkpoint, sources, mapped=mapped, lazy=lazy)
        _load_params(model, checkpoint, params, stored, tensors, linear_names, stored_spec,
                     spec, head_format, lm_head, compute_dtype, device, progress)
        native_bf16_linears(model)
    checkpoint.close()
    release_freed_memory()
    return model


def _kept_as_stored(group: list[str], quantized: bool, device: torch.device) -> set[str]:
    """The tensors of ``group`` that are mapped, not read (``Checkpoint.map``): a 4-bit weight in the
    kernels' layout and its kernel scales, and a q6 weight's codes and steps, which the model keeps
    byte for byte as stored and which only dsmoe's kernels (unaligned loads) and torch's elementwise
    ops read. Others are read into memory of their own: torch kernels may assume their allocator's
    64-byte alignment, which a safetensors offset does not have (an int8 weight mapped at an odd
    offset crashed ``_weight_int8pack_mm``); a 4-bit weight in bitsandbytes' layout is then repacked
    in place."""
    if device.type != "cpu" or not quantized:
        return set()
    scales = next((name for name in group if name.endswith(f".weight.{NATIVE_SCALES}")), None)
    if scales is not None:
        return {scales, scales[: -len(NATIVE_SCALES) - 1]}
    q6_steps = next((name for name in group if name.endswith(f".weight.{Q6_STEPS}")), None)
    return set() if q6_steps is None else {q6_steps, q6_steps[: -len(Q6_STEPS) - 1]}


def _load_params(model: DeepseekForCausalLM, checkpoint: Checkpoint, params: list[str], stored: list[bool],
                 reads: Iterator[dict[str, torch.Tensor]], linear_names: set[str], stored_spec: QuantSpec | None,
                 spec: QuantSpec | None, head_format: str | None, lm_head: str | None, compute_dtype: torch.dtype,
                 device: torch.device, progress: LoadProgress | None) -> None:
    """Each parameter into ``model``: stored quantized linears as they are, floats quantized or cast."""
    release = ReleaseEvery()
    for done, (name, quantized, tensors) in enumerate(zip(params, stored, reads), start=1):
        module_name, _, attr = name.rpartition(".")
        release.processed(checkpoint.nbytes(name) if name in checkpoint else 0)
        if quantized:
            assert stored_spec is not None  # only a quantized checkpoint stores quantized linears
            module = linear_from_tensors(tensors, module_name, stored_spec, compute_dtype, own=True)
            if name == LM_HEAD and lm_head is not None and lm_head != ("q6" if isinstance(module, Linear6bit) else "int8"):
                raise UsageError(f"{checkpoint.path} stores lm_head quantized in another format than {lm_head}: "
                                 "load it without --lm-head, or quantize the float source with it")
            _replace_module(model, module_name, module.to(device))
        else:
            tensor = _checked_float(checkpoint, model, name, *tensors.popitem())
            layer_spec = spec_for(name, spec) if spec is not None and module_name in linear_names else None
            if name == LM_HEAD and head_format is not None:
                layer_spec = LM_HEAD_SPECS[head_format]  # with no spec too: a stored float lm_head, or a float model's
            if layer_spec is not None:
                _replace_module(model, module_name, quantize_linear(tensor.to(device), layer_spec, compute_dtype))
            else:
                # The router stays in fp32 (it is tiny): expert choices must not flip with the dtype.
                param_dtype = torch.float32 if name.endswith(".mlp.gate.weight") else compute_dtype
                _set_parameter(model, module_name, attr, tensor.to(device=device, dtype=param_dtype))
        if progress is not None:
            progress(done, len(params))


class _WithoutRandomInit(TorchFunctionMode):
    """Skips the modules' random initialisation while the skeleton is built: every weight is read
    from the checkpoint next. Even on the meta device the first random init costs 2-3 s of lazy
    imports (torch's decompositions), 5 s on a busy machine, in every load."""

    SKIPPED = frozenset({"normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                         "xavier_normal_", "trunc_normal_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self.SKIPPED:
            return args[0] if args else kwargs["tensor"]  # the tensor, as the in-place init returns it
        return func(*args, **kwargs)


def _quant_spec(
    checkpoint: Checkpoint, bits: int | None, quant_type: str | None, double_quant: bool, head_format: str | None
) -> QuantSpec | None:
    if bits is None or bits == 16:
        return None
    if checkpoint.config.quantization_config is not None:
        raise UsageError(f"{checkpoint.path}: already quantized; load it without --bits")
    default_type = "nf4" if bits == 4 else "int8"
    return QuantSpec(bits=bits, quant_type=quant_type or default_type, double_quant=double_quant,
                     quantize_lm_head=head_format is not None, lm_head=head_format or "int8")


def _is_quantized_in(checkpoint: Checkpoint, weight_name: str) -> bool:
    """A weight stored as bitsandbytes integers rather than floats."""
    return weight_name in checkpoint and checkpoint.dtype(weight_name) in ("U8", "I8")


def _group_by_module(names: list[str]) -> dict[str, list[str]]:
    """Tensor names by the module they belong to (``X.weight.absmax`` and ``X.SCB`` go to ``X``)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        cut = name.rfind(".weight")
        module = name[:cut] if cut >= 0 else name.rpartition(".")[0]
        groups.setdefault(module, []).append(name)
    return groups


def _source_of(checkpoint: Checkpoint, name: str) -> str:
    """The stored tensor a float parameter is read from (a tied lm_head: the embedding)."""
    if name not in checkpoint and name == "lm_head.weight" and checkpoint.config.tie_word_embeddings:
        return EMBEDDING
    if name.endswith(".mlp.gate.weight") and name not in checkpoint:
        raise CheckpointError(f"{checkpoint.path}: tensor {name!r} (router gate) is missing from the checkpoint")
    checkpoint.nbytes(name)  # a missing tensor fails here, named, before any read
    return name


def _checked_float(checkpoint: Checkpoint, model: nn.Module, name: str, source: str,
                   tensor: torch.Tensor) -> torch.Tensor:
    expected = tuple(model.get_parameter(name).shape)
    if tuple(tensor.shape) != expected:
        raise CheckpointError(
            f"{checkpoint.shard_of(source)}: tensor {source!r} has shape {list(tensor.shape)}, "
            f"config.json implies {list(expected)}"
        )
    if not tensor.is_floating_point():
        raise CheckpointError(f"{checkpoint.shard_of(source)}: tensor {source!r} is {tensor.dtype}, expected floats")
    return tensor


def _set_parameter(model: nn.Module, module_name: str, attr: str, tensor: torch.Tensor) -> None:
    module = model.get_submodule(module_name) if module_name else model
    module.register_parameter(attr, nn.Parameter(tensor, requires_grad=False))


def _replace_module(model: nn.Module, module_name: str, new: nn.Module) -> None:
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
