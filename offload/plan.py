"""Where each routed expert lives, from the budgets (or the free memory), before anything loads.

A plan is arithmetic on the config: it is what ``dsmoe info --plan`` shows and what the store is
built from, so the numbers a user reads are the ones the run uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psutil
import torch

from dsmoe.errors import UsageError
from dsmoe.checkpoint.config import DeepseekConfig
from dsmoe.model.deepseek import BYTES_PER_WEIGHT, parameter_counts

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

    @classmethod
    def measure(cls, device: torch.device) -> "Resources":
        gpu_free = None
        if device.type == "cuda":
            gpu_free, _ = torch.cuda.mem_get_info(device)
        return cls(gpu_free, psutil.virtual_memory().available, psutil.Process().memory_info().rss)


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


def make_plan(
    config: DeepseekConfig,
    device: torch.device,
    budgets: Budgets,
    resources: Resources,
    dtype: torch.dtype = torch.bfloat16,
    bits: int | None = None,
) -> Plan:
    """Split the experts between the compute device, RAM and disk; UsageError if a budget is too small."""
    if config.n_routed_experts is None or not config.moe_layers:
        raise UsageError("this model has no routed experts to offload")
    if budgets.gpu_mem is not None and device.type != "cuda":
        raise UsageError("--gpu-mem needs a CUDA GPU (none is in use); use --max-ram or --expert-cache on the CPU")
    if budgets.expert_cache is not None and budgets.expert_cache < 1:
        raise UsageError(f"--expert-cache must be at least 1 slot per layer, got {budgets.expert_cache}")
    expert, rest = expert_sizes(config, dtype, bits)
    layers, n = config.moe_layers, config.n_routed_experts
    per_slot = expert * len(layers)
    # Working room: one expert being read and converted, activations and a short KV cache.
    reserve = 2 * expert + WORKSPACE
    notes: list[str] = []

    def slots_within(budget: float, fixed: int, what: str) -> int:
        slots = int((budget - fixed - reserve) // per_slot)
        if slots < 1:
            raise UsageError(
                f"{what} of {budget / GB:.2f} GB cannot hold {fixed / GB:.2f} GB of resident weights "
                f"plus one expert per layer ({per_slot / GB:.3f} GB)"
            )
        return min(slots, n)

    ram_budget = budgets.max_ram
    ram_cap = int(ram_budget) if ram_budget is not None else None
    if ram_budget is None:
        ram_room = resources.ram_available * FREE_SHARE
        notes.append(f"RAM: {resources.ram_available / GB:.2f} GB available at start, planning with {FREE_SHARE:.0%}")
    else:
        ram_room = ram_budget - resources.process_rss
        notes.append(f"RAM: budget {ram_budget / GB:.2f} GB, {resources.process_rss / GB:.2f} GB already used by the process")

    if device.type == "cpu":
        if budgets.max_ram is None and rest + n * per_slot <= ram_room:
            slots = n
        else:
            slots = slots_within(ram_room, rest, "--max-ram" if budgets.max_ram is not None else "available RAM")
        if slots == n and budgets.expert_cache is None:
            return Plan("cpu", [Tier("ram", n, True, ram_cap)],
                        expert, rest, layers, n, config.num_experts_per_tok or 0, False, notes)
        if slots == n:
            # Everything fits in RAM, yet slots were asked for: a copy-in "device" within RAM,
            # which runs the same decisions as a GPU cache (useful to test and to measure).
            cache = min(budgets.expert_cache or n, n)
            tiers = [Tier("cpu", cache, True, None), Tier("ram", n, False, None)]
        else:
            cache = min(budgets.expert_cache or slots, slots)
            tiers = [Tier("ram", cache, True, ram_cap), Tier("disk", n, False, None)]
        return Plan("cpu", tiers, expert, rest, layers, n, config.num_experts_per_tok or 0, False, notes)

    name = str(device if device.index is not None else torch.device("cuda", 0))
    gpu_budget = budgets.gpu_mem
    if gpu_budget is None:
        gpu_budget = (resources.gpu_free or 0) * FREE_SHARE
        notes.append(f"GPU: {(resources.gpu_free or 0) / GB:.2f} GB free at start, planning with {FREE_SHARE:.0%}")
    device_slots = slots_within(gpu_budget, rest, "--gpu-mem" if budgets.gpu_mem is not None else "free GPU memory")
    if budgets.expert_cache is not None:
        device_slots = min(budgets.expert_cache, device_slots)
    gpu_tier = Tier(name, device_slots, True, int(gpu_budget))
    if n * per_slot + reserve <= ram_room:
        tiers = [gpu_tier, Tier("ram", n, False, ram_cap)]
    else:
        ram_slots = slots_within(ram_room, 0, "--max-ram" if budgets.max_ram is not None else "available RAM")
        tiers = [gpu_tier, Tier("ram", max(ram_slots, device_slots), False, ram_cap),
                 Tier("disk", n, False, None)]
    return Plan(name, tiers, expert, rest, layers, n, config.num_experts_per_tok or 0, True, notes)
