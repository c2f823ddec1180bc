"""Put a model together with its expert store: from a checkpoint (``load_offloaded``) or in memory."""

from __future__ import annotations

import os
from pathlib import Path
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from dsmoe.errors import CheckpointError, UsageError
from dsmoe.checkpoint.reader import Checkpoint, open_checkpoint
from dsmoe.model.deepseek import DeepseekForCausalLM
from dsmoe.model.deepseek import RowEmbedding
from dsmoe.model.loader import EMBEDDING, LoadProgress, load_model, parse_dtype
from dsmoe.model.tokenizer import Tokenizer, load_tokenizer
from dsmoe.offload.disk import DiskExperts
from dsmoe.offload.pack import ExpertSlots, Layout, PackReader, layout_of, pack_path, read_manifest, write_pack
from dsmoe.offload.plan import Budgets, Plan, Resources, make_plan
from dsmoe.offload.policies import POLICIES
from dsmoe.offload.store import (
    CostModel,
    CudaCopy,
    DiskSource,
    ExpertStore,
    HostCopy,
    InPlace,
    PackedSource,
    RamCachedSource,
    ResidentSource,
    Source,
    Transfer,
)
from dsmoe.quant import QuantSpec, spec_from_config
from dsmoe.quant.cache import discard, source_identity


@dataclass(frozen=True)
class OffloadOptions:
    """How to place and run the routed experts.

    ``host_compute`` (GPU only) runs a missing expert on the CPU when the cost model says that beats
    copying it; the CPU's kernels round differently from the GPU's, so it is off by default and
    outputs stay identical to a fully resident run.
    """

    budgets: Budgets = field(default_factory=Budgets)
    policy: str = "lru"
    prefetch: bool = True
    host_compute: CostModel | None = None
    device: str | None = None
    disk_cache: bool = True
    """Experts on disk on the CPU are read from an expert pack (``offload/pack.py``), written on
    first use; False reads them from the checkpoint's files every time."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise UsageError(f"unknown cache policy {self.policy!r} (choose {' or '.join(POLICIES)})")

    def compute_device(self) -> torch.device:
        """The requested device, else the GPU when there is one, else the CPU."""
        if self.device is not None:
            device = torch.device(self.device)
            if device.type == "cuda" and not torch.cuda.is_available():
                raise UsageError(f"device {self.device!r} requested but CUDA is not available")
            return device
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def plan_for(
    checkpoint: Checkpoint, options: OffloadOptions, dtype: str | torch.dtype = torch.bfloat16, bits: int | None = None,
    resources: Resources | None = None, lm_head_int8: bool | None = None,
) -> Plan:
    """The placement a run with these options would use on this machine now (or with ``resources``);
    ``lm_head_int8`` is the load's ``quantize_lm_head``."""
    device = options.compute_device()
    resources = resources or Resources.measure(device)
    return make_plan(checkpoint.config, device, options.budgets, resources, parse_dtype(dtype),
                     None if bits == 16 else bits, lm_head_int8)


def load_offloaded(
    name_or_path: str | os.PathLike[str] | Checkpoint,
    options: OffloadOptions,
    dtype: str | torch.dtype = torch.bfloat16,
    bits: int | None = None,
    quant_type: str | None = None,
    double_quant: bool = False,
    quantize_lm_head: bool | None = None,
    progress: LoadProgress | None = None,
    resources: Resources | None = None,
    lm_head: str | None = None,
) -> tuple[DeepseekForCausalLM, Tokenizer | None, ExpertStore]:
    """Load a checkpoint with its routed experts placed by ``options``; the rest goes to the device.

    When the plan keeps experts on disk they are never loaded here: the store reads them on demand.
    ``resources`` replaces the measured free memory (to plan as if on another machine). Most
    callers want ``dsmoe.load``, which comes here when its options ask for an expert store.
    """
    checkpoint = open_checkpoint(name_or_path) if isinstance(name_or_path, (str, os.PathLike)) else name_or_path
    plan = plan_for(checkpoint, options, dtype, bits, resources, quantize_lm_head)
    device = torch.device(plan.compute)
    if plan.on_disk:
        disk = DiskExperts(checkpoint, parse_dtype(dtype), quantize=_expert_spec(checkpoint, bits, quant_type, double_quant),
                           stored=_stored_spec(checkpoint))
        on_cpu = device.type == "cpu"
        model = load_model(checkpoint, dtype=dtype, bits=bits, quant_type=quant_type, double_quant=double_quant,
                           quantize_lm_head=quantize_lm_head, lm_head=lm_head, device=device, progress=progress,
                           skip_routed_experts=True, skip_embedding=on_cpu, map_weights=False)
        if on_cpu:  # a token needs one row of the table: read from the file, not held in RAM
            rows = RowEmbedding(checkpoint.rows(EMBEDDING), parse_dtype(dtype))
            model.model.embed_tokens = rows  # type: ignore[assignment]  # nn.Embedding's interface, its rows on disk
        if options.budgets.max_ram is not None and resources is None:
            plan = _replan_after_load(checkpoint, options, dtype, bits, plan, quantize_lm_head)
        for moe in model.moe_layers():
            moe.experts = nn.ModuleList()
        source, note = _disk_source(checkpoint, disk, plan, options)
        plan = replace(plan, notes=[*plan.notes, note])
        if plan.host_slots is not None:
            source = RamCachedSource(source, plan.host_slots, options.policy)
        store = _store(model, plan, source, options)
    else:
        model = load_model(checkpoint, dtype=dtype, bits=bits, quant_type=quant_type, double_quant=double_quant,
                           quantize_lm_head=quantize_lm_head, lm_head=lm_head, device="cpu",
                           progress=progress)
        store = attach(model, plan, options)
    return model, load_tokenizer(checkpoint.path, checkpoint.config.vocab_size), store


def _disk_source(checkpoint: Checkpoint, disk: DiskExperts, plan: Plan, options: OffloadOptions) -> tuple[Source, str]:
    """The expert pack's slots where the CPU computes in a packable format (the pack written now if
    it is not there yet), else the checkpoint's own files; and one line saying which, and why."""
    fallback = DiskSource(disk, pinned=plan.pinned)
    if plan.compute != "cpu" or plan.host_slots is not None:
        return fallback, "experts read from the checkpoint's files (the expert pack serves CPU compute)"
    if not options.disk_cache:
        return fallback, "experts read from the checkpoint's files (--no-cache: no expert pack)"
    keys = disk.keys()
    layout = layout_of(disk.build(*keys[0]))
    if layout is None:
        return fallback, "experts read from the checkpoint's files (their format has no expert pack)"
    entry = pack_path(checkpoint.path, disk.quantize)
    manifest = read_manifest(entry)
    if manifest is not None and Layout.from_json(manifest["layout"]) != layout:
        return fallback, f"experts read from the checkpoint's files ({entry} holds another layout)"
    done = "read from the expert pack in"
    if manifest is None:
        if os.path.lexists(entry):
            discard(entry)  # damaged or partial: set aside in one rename, then written again
        try:
            write_pack(disk.build, keys, entry, source_identity(checkpoint.path))
        except (OSError, CheckpointError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            return fallback, f"experts read from the checkpoint's files (the expert pack was not written: {reason})"
        done = "packed once into"
    slots = ExpertSlots(PackReader(entry), plan.moe_layers, plan.device_slots, disk.dtype)
    where = str(entry).replace(str(Path.home()), "~", 1)
    return PackedSource(slots), f"experts {done} {where} (direct reads: {'yes' if slots.reader.direct else 'no'})"


def _replan_after_load(checkpoint: Checkpoint, options: OffloadOptions, dtype: str | torch.dtype,
                       bits: int | None, plan: Plan, lm_head_int8: bool | None) -> Plan:
    """Size the RAM slots again from the RSS measured once the resident weights are in.

    Loading leaves more than the weights' bytes behind (allocator and library state), so the
    process's own overhead is read back, not assumed, and a --max-ram budget holds.
    """
    measured = Resources.measure(torch.device(plan.compute))
    in_ram = plan.rest_bytes if plan.compute == "cpu" else 0
    baseline = replace(measured, process_rss=max(0, measured.process_rss - in_ram))
    return plan_for(checkpoint, options, dtype, bits, baseline, lm_head_int8)


def attach(model: DeepseekForCausalLM, plan: Plan, options: OffloadOptions) -> ExpertStore:
    """Hand a loaded model's routed experts (in RAM) to a new store, and move the rest to the device."""
    if plan.on_disk:
        raise UsageError("this plan keeps experts on disk: load the model with load_offloaded instead")
    modules = {}
    for moe in model.moe_layers():
        modules.update({(moe.layer_idx, e): expert for e, expert in enumerate(moe.experts)})
        moe.experts = nn.ModuleList()
    model.to(torch.device(plan.compute))
    return _store(model, plan, ResidentSource(modules, pinned=plan.pinned), options)


def _store(model: DeepseekForCausalLM, plan: Plan, source: Source, options: OffloadOptions) -> ExpertStore:
    transfer: Transfer
    if plan.compute != "cpu":
        transfer = CudaCopy(torch.device(plan.compute))
    elif plan.tiers[0].name == "cpu" and plan.device_slots < plan.n_experts:
        transfer = HostCopy()  # a stand-in device's copies; with a slot for every expert the slot is the weight itself
    else:
        transfer = InPlace(background=plan.on_disk)
    cost = options.host_compute if plan.compute != "cpu" else None
    return ExpertStore(model, plan, source, transfer, options.policy, options.prefetch, cost)


def store_of(model: DeepseekForCausalLM) -> ExpertStore | None:
    """The store running ``model``'s experts, if it has one (for stats displays)."""
    holder = model.experts_channel.holder
    return holder if isinstance(holder, ExpertStore) else None


def _expert_spec(checkpoint: Checkpoint, bits: int | None, quant_type: str | None, double_quant: bool) -> QuantSpec | None:
    """The format experts are quantized into as they are read: the loader's, for ``--bits``."""
    if bits is None or bits == 16 or checkpoint.config.quantization_config is not None:
        return None
    return QuantSpec(bits=bits, quant_type=quant_type or ("nf4" if bits == 4 else "int8"), double_quant=double_quant)


def _stored_spec(checkpoint: Checkpoint) -> QuantSpec | None:
    if checkpoint.config.quantization_config is None:
        return None
    return spec_from_config(checkpoint.config.quantization_config)
