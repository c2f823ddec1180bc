"""Where each routed expert lives, from the budgets (or the free memory), before anything loads.

A plan is arithmetic on the config: it is what ``dsmoe info --plan`` shows and what the store is
built from, so the numbers a user reads are the ones the run uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import psutil
import torch

from dsmoe.errors import UsageError
from dsmoe.checkpoint.free_memory import available_memory
from dsmoe.checkpoint.config import DeepseekConfig
from dsmoe.model.deepseek import BYTES_PER_WEIGHT, parameter_counts
from dsmoe.quant.spec import lm_head_quantized

GB = 1e9
# Fraction of a measured free amount the plan lets itself use when no budget is given.
FREE_SHARE = 0.9
# Bytes kept free for activations, a KV cache of a few thousand tokens and the runtime's buffers.
WORKSPACE = 128 * 2**20


@dataclass(frozen=True)
class Budgets:
    """What the user asked for; None means "measure it" (or, for ``expert_cache``, "derive it")."""

    gpu_mem: float | None = None
    """Bytes of GPU memory for the whole model (weights kept resident plus the expert slots)."""
    max_ram: float | None = None
    """Bytes of host RAM the process may use (its peak RSS); below the model's size, experts stay on disk."""
    expert_cache: int | None = None
    """Expert slots per MoE layer on the compute device, overriding what a budget would give."""


@dataclass(frozen=True)
class Resources:
    """What the machine has free at start."""

    gpu_free: int | None
    ram_available: int
    process_rss: int
    ram_source: str = "MemAvailable"
    """Which reading ``ram_available`` is: the kernel's MemAvailable or the memory cgroup's room."""

    @classmethod
    def measure(cls, device: torch.device) -> "Resources":
        gpu_free = None
        if device.type == "cuda":
            gpu_free, _ = torch.cuda.mem_get_info(device)
        available, source = available_memory()
        return cls(gpu_free, available, psutil.Process().memory_info().rss, source)


@dataclass(frozen=True)
class Tier:
    """One place experts live; ``slots`` experts per MoE layer (``n_experts`` means all of them)."""

    name: str
    slots: int
    holds_rest: bool
    """Whether the non-expert weights (attention, norms, router, shared experts, embeddings) live here."""
    budget: int | None


@dataclass(frozen=True)
class Plan:
    compute: str
    tiers: list[Tier]
    """Fastest first; the last holds every expert."""
    expert_bytes: int
    rest_bytes: int
    moe_layers: list[int]
    n_experts: int
    top_k: int
    pinned: bool
    notes: list[str] = field(default_factory=list)
    fitted: str | None = None
    """With no RAM budget given, the one line saying the model did not fit and dsmoe planned this itself."""
    rest_read_bytes: int | None = None
    """Bytes of the resident part one decoded token reads: all of it but the embedding table, of
    which it reads one row (None: ``rest_bytes``)."""

    @property
    def device_slots(self) -> int:
        return self.tiers[0].slots

    @property
    def on_disk(self) -> bool:
        return self.tiers[-1].name == "disk"

    @property
    def host_slots(self) -> int | None:
        """RAM slots per layer when RAM is a cache between the device and the disk."""
        if len(self.tiers) == 3:
            return self.tiers[1].slots
        return None

    def tier_bytes(self, tier: Tier) -> int:
        experts = min(tier.slots, self.n_experts) * len(self.moe_layers) * self.expert_bytes
        return experts + (self.rest_bytes if tier.holds_rest else 0)

    def expected_link_bytes(self) -> dict[str, float]:
        """Bytes per token into each tier, assuming routing spread evenly over the experts.

        With uniform routing a cache of s slots out of n hits s/n of the time; a real model's
        routing is skewed, so ``dsmoe simulate`` on a trace gives the measured figure.
        """
        links: dict[str, float] = {}
        for upper, lower in zip(self.tiers, self.tiers[1:]):
            miss = 1.0 - min(upper.slots, self.n_experts) / self.n_experts
            links[f"{lower.name}->{upper.name}"] = len(self.moe_layers) * self.top_k * miss * self.expert_bytes
        return links


def expert_sizes(config: DeepseekConfig, dtype: torch.dtype, bits: int | None) -> tuple[int, int]:
    """(bytes of one routed expert, bytes of everything else) at the runtime precision."""
    if bits is None and config.quantization_config is not None:
        bits = 4 if config.quantization_config.get("load_in_4bit") else 8
    element = torch.empty((), dtype=dtype).element_size()
    per_weight = BYTES_PER_WEIGHT[bits] if bits in (4, 8) else element
    counts = parameter_counts(config)
    per_expert = 3 * config.hidden_size * config.moe_intermediate_size
    rest = (counts["quantizable"] - counts["routed_experts"]) * per_weight + counts["kept"] * element
    return int(per_expert * per_weight), int(rest)


def resident_bytes(config: DeepseekConfig, dtype: torch.dtype, bits: int | None, lm_head_int8: bool | None,
                   embedding_in_file: bool) -> int:
    """Bytes of everything but the routed experts as a run holds them: lm_head at int8's size where
    the load quantizes it (``lm_head_quantized``; the q6 head of 4-bit runs is 22% smaller, so the
    plan errs on the safe side), the embedding table left out where its rows are read
    from the file (CPU compute with experts on disk, ``RowEmbedding``)."""
    _, rest = expert_sizes(config, dtype, bits)
    if bits is None and config.quantization_config is not None:
        bits = 4 if config.quantization_config.get("load_in_4bit") else 8
    element = torch.empty((), dtype=dtype).element_size()
    table = config.vocab_size * config.hidden_size
    if config.tie_word_embeddings:
        return rest
    if lm_head_quantized(lm_head_int8, bits in (4, 8)):
        # int8 weights, and per row the fp32 SCB and scale and the bf16 unit Linear8bit keeps.
        rest += table + config.vocab_size * (4 + 4 + 2) - table * element
    return rest - (table * element if embedding_in_file else 0)


def model_bytes(config: DeepseekConfig, dtype: torch.dtype, bits: int | None) -> int:
    """Bytes of every weight at the runtime precision: what a load held wholly in memory takes."""
    expert, rest = expert_sizes(config, dtype, bits)
    return rest + (config.n_routed_experts or 0) * len(config.moe_layers) * expert


def fits_in_ram(config: DeepseekConfig, resources: Resources, dtype: torch.dtype, bits: int | None) -> bool:
    """Whether the whole model and the workspace fit in the share of available RAM a plan may use."""
    return model_bytes(config, dtype, bits) + WORKSPACE <= resources.ram_available * FREE_SHARE


def size_text(n: float) -> str:
    """Bytes for a message: GB down to 1 GB, then MB, then kB (a tiny model's sizes stay readable)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 1e3:.1f} kB"


def _precision(dtype: torch.dtype, bits: int | None) -> str:
    return f"{bits}-bit" if bits in (4, 8) else str(dtype).removeprefix("torch.")


def make_plan(
    config: DeepseekConfig,
    device: torch.device,
    budgets: Budgets,
    resources: Resources,
    dtype: torch.dtype = torch.bfloat16,
    bits: int | None = None,
    lm_head_int8: bool | None = None,
) -> Plan:
    """Split the experts between the compute device, RAM and disk; UsageError if a budget is too small.

    ``lm_head_int8`` is the load's ``--quantize-lm-head`` (None: the default, int8 in a 4- or 8-bit
    run); with experts on disk on the CPU the embedding table stays in the file (``RowEmbedding``),
    so neither is counted at bf16 in what the slots must leave room for.
    """
    if config.n_routed_experts is None or not config.moe_layers:
        raise UsageError("this model has no routed experts to offload")
    if budgets.gpu_mem is not None and device.type != "cuda":
        raise UsageError("--gpu-mem needs a CUDA GPU (none is in use); use --max-ram or --expert-cache on the CPU")
    if budgets.expert_cache is not None and budgets.expert_cache < 1:
        raise UsageError(f"--expert-cache must be at least 1 slot per layer, got {budgets.expert_cache}")
    if bits is None and config.quantization_config is not None:
        bits = 4 if config.quantization_config.get("load_in_4bit") else 8
    expert, _ = expert_sizes(config, dtype, bits)
    rest = resident_bytes(config, dtype, bits, lm_head_int8, embedding_in_file=False)
    rest_disk = resident_bytes(config, dtype, bits, lm_head_int8, embedding_in_file=device.type == "cpu")
    element = torch.empty((), dtype=dtype).element_size()
    layers, n = config.moe_layers, config.n_routed_experts
    top_k = config.num_experts_per_tok or 0
    per_slot = expert * len(layers)
    # Working room: one expert being read and converted, activations and a short KV cache.
    reserve = 2 * expert + WORKSPACE
    # A token reads one row of the embedding table (a tied table is read whole, as lm_head).
    rest_read = rest - (0 if config.tie_word_embeddings else (config.vocab_size - 1) * config.hidden_size * element)
    notes: list[str] = []

    def slots_within(budget: float, used: int, fixed: int, what: str) -> int:
        """Slots per layer in ``budget`` once ``used``, the workspace and ``fixed`` are taken."""
        slots = int((budget - used - fixed - reserve) // per_slot)
        if slots < 1:
            raise UsageError(_too_small(what, budget, used, reserve, fixed, per_slot))
        return min(slots, n)

    ram_budget = budgets.max_ram
    ram_cap = int(ram_budget) if ram_budget is not None else None
    if ram_budget is None:
        ram_room, ram_used, ram_what = resources.ram_available * FREE_SHARE, 0, "available RAM"
        notes.append(f"RAM: {resources.ram_available / GB:.2f} GB available at start ({resources.ram_source}), "
                     f"planning with {FREE_SHARE:.0%}")
    else:
        ram_room, ram_used, ram_what = ram_budget, resources.process_rss, "--max-ram"
        notes.append(f"RAM: budget {ram_budget / GB:.2f} GB, {resources.process_rss / GB:.2f} GB already used by the process")

    def finish(name: str, tiers: list[Tier], pinned: bool) -> Plan:
        resident = rest_disk if name == "cpu" and tiers[-1].name == "disk" else rest
        plan = Plan(name, tiers, expert, resident, layers, n, top_k, pinned, notes, rest_read_bytes=rest_read)
        if ram_budget is None and plan.on_disk:
            ram_slots = plan.tiers[-2].slots
            fitted = (f"the model needs {size_text(model_bytes(config, dtype, bits) + WORKSPACE)} at "
                      f"{_precision(dtype, bits)} with its workspace and {size_text(resources.ram_available)} is "
                      f"available ({resources.ram_source}): routed experts stay on disk, {ram_slots} of {n} per "
                      f"layer cached in RAM (--max-ram sets the budget)")
            plan = replace(plan, fitted=fitted)
        return plan

    if device.type == "cpu":
        if budgets.max_ram is None:
            everything = fits_in_ram(config, resources, dtype, bits)
        else:
            everything = ram_used + rest + reserve + n * per_slot <= ram_room
        if everything and budgets.expert_cache is None:
            return finish("cpu", [Tier("ram", n, True, ram_cap)], False)
        if everything:
            # Everything fits in RAM, yet slots were asked for: a copy-in "device" within RAM,
            # which runs the same decisions as a GPU cache (useful to test and to measure).
            cache = min(budgets.expert_cache or n, n)
            tiers = [Tier("cpu", cache, True, None), Tier("ram", n, False, None)]
        else:
            slots = slots_within(ram_room, ram_used, rest_disk, ram_what)
            cache = min(budgets.expert_cache or slots, slots)
            tiers = [Tier("ram", cache, True, ram_cap), Tier("disk", n, False, None)]
        return finish("cpu", tiers, False)

    name = str(device if device.index is not None else torch.device("cuda", 0))
    gpu_budget = budgets.gpu_mem
    if gpu_budget is None:
        gpu_budget = (resources.gpu_free or 0) * FREE_SHARE
        notes.append(f"GPU: {(resources.gpu_free or 0) / GB:.2f} GB free at start, planning with {FREE_SHARE:.0%}")
    device_slots = slots_within(gpu_budget, 0, rest, "--gpu-mem" if budgets.gpu_mem is not None else "free GPU memory")
    if budgets.expert_cache is not None:
        device_slots = min(budgets.expert_cache, device_slots)
    gpu_tier = Tier(name, device_slots, True, int(gpu_budget))
    if ram_used + n * per_slot + reserve <= ram_room:
        tiers = [gpu_tier, Tier("ram", n, False, ram_cap)]
    else:
        ram_slots = slots_within(ram_room, ram_used, 0, ram_what)
        tiers = [gpu_tier, Tier("ram", max(ram_slots, device_slots), False, ram_cap),
                 Tier("disk", n, False, None)]
    return finish(name, tiers, True)


def _too_small(what: str, budget: float, used: int, workspace: int, resident: int, per_slot: int) -> str:
    """The refusal, with its sum: what is taken, what the plan needs, and the least that would do."""
    need = used + workspace + resident + per_slot
    parts = ([f"the process already uses {size_text(used)}"] if used else []) + [
        f"the workspace (activations, KV cache, two experts in flight) {size_text(workspace)}",
        f"the resident weights {size_text(resident)}",
        f"one expert per MoE layer {size_text(per_slot)}",
    ]
    total = f"{', '.join(parts[:-1])} and {parts[-1]} add up to {size_text(need)}"
    if what.startswith("--"):
        least = math.ceil(need / GB * 100) / 100
        return f"{what} {budget / GB:g} ({size_text(budget)}) is too small: {total}; the least that works is {what} {least:.2f}"
    free = math.ceil(need / FREE_SHARE / GB * 100) / 100
    return (f"{what} ({size_text(budget)}, {FREE_SHARE:.0%} of what is free) cannot hold this model even with "
            f"its experts on disk: {total}; it needs at least {free:.2f} GB free")


@dataclass(frozen=True)
class Prediction:
    """Decode speed a plan should reach: a token reads its weights from RAM and its misses from disk.

    Decoding one token is bound by bytes moved, not arithmetic, so the time is the bytes read from
    memory over the memory bandwidth plus the bytes read from disk over the disk bandwidth.
    """

    memory_bytes: float
    """Bytes one token reads from RAM: the resident part (one embedding row) and its top-k experts."""
    disk_bytes: float
    """Bytes one token reads from disk: its experts that miss the RAM slots."""
    memory_bandwidth: float
    disk_bandwidth: float
    hit_rate: float
    """The share of a token's experts found in RAM."""

    @property
    def seconds_per_token(self) -> float:
        return self.memory_bytes / self.memory_bandwidth + self.disk_bytes / self.disk_bandwidth

    @property
    def tokens_per_second(self) -> float:
        return 1.0 / self.seconds_per_token


def predict(plan: Plan, memory_bandwidth: float, disk_bandwidth: float, hit_rate: float | None = None,
            disk_bytes: float | None = None) -> Prediction:
    """The decode speed of a CPU plan from measured bandwidths (bytes/s) and a RAM hit rate.

    ``hit_rate`` (a share of a token's experts found in RAM, e.g. from ``dsmoe simulate`` on a
    trace) defaults to what even routing gives: slots / experts. ``disk_bytes``, what a decode
    step reads from disk (the simulator's count: misses and prefetches, wrong guesses included),
    defaults to the misses alone. Copies between two tiers in RAM (``--expert-cache`` with the
    model resident) read and write each missed expert once more.
    """
    if plan.compute != "cpu":
        raise UsageError("a tok/s prediction needs a CPU plan: the probes measure RAM and disk, not the GPU")
    if hit_rate is not None and not 0.0 <= hit_rate <= 1.0:
        raise UsageError(f"a hit rate is a share between 0 and 1, got {hit_rate}")
    per_token = len(plan.moe_layers) * plan.top_k * plan.expert_bytes
    resident = plan.rest_bytes if plan.rest_read_bytes is None else plan.rest_read_bytes
    memory: float = resident + per_token
    cached = plan.tiers[-2] if len(plan.tiers) > 1 else plan.tiers[0]
    hits = min(cached.slots, plan.n_experts) / plan.n_experts if hit_rate is None else hit_rate
    if not plan.on_disk:
        disk = 0.0
    else:
        disk = per_token * (1.0 - hits) if disk_bytes is None else disk_bytes
    if plan.tiers[0].name == "cpu":  # a copy-in cache within RAM: each miss is read and written once more
        memory += 2 * per_token * (1.0 - hits)
    return Prediction(memory, disk, memory_bandwidth, disk_bandwidth, hits)
