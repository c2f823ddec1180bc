"""The expert store: owns where every routed expert lives and runs each one from there.

It plugs into the model through the model's one ``ExpertChannel`` (model/routing.py): each MoE
layer tells it the routing of a forward pass before its experts run (``routed``: the layer's input
too, to which the next layer's gate is applied for prefetch), then asks it to run each chosen
expert (``run``). The model's kernels and its order of summation are untouched, so outputs equal a
fully resident run.

Tiers are pluggable: a ``Source`` gives an expert as a module in host memory (resident in RAM,
or read from disk), a ``Transfer`` puts it into a slot on the compute device (a CUDA copy on a
side stream, a real copy within RAM standing in for a device, or nothing at all when the source's
memory is the slot). The decisions (hits, evictions, prefetch, where to run a miss) live here and
in ``schedule.Schedule``, whatever the tiers are.
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dsmoe.model.deepseek import MLP, DeepseekForCausalLM
from dsmoe.model.layer_plan import building_detached
from dsmoe.quant.linear import SwiGLUKernel
from dsmoe.offload.disk import DiskExperts
from dsmoe.offload.pack import DATA, ExpertSlots
from dsmoe.offload.plan import Plan
from dsmoe.offload.policies import LayerCache
from dsmoe.offload.schedule import READ_WORKERS, Schedule
from dsmoe.offload.stats import StoreStats

Key = tuple[int, int]


def module_bytes(module: nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def clone_to(module: nn.Module, device: torch.device, non_blocking: bool = False) -> nn.Module:
    """A copy of ``module`` with its own tensors on ``device``; the original is left as it was.

    ``Module.to`` would change the shared Parameter objects in place, so the copy gets new ones.
    Modules with their own ``_apply`` (quantized linears) then rebuild their device layout.
    """
    clone = copy.copy(module)
    clone._parameters = {
        name: None if p is None else nn.Parameter(p.detach().to(device, non_blocking=non_blocking, copy=True),
                                                  requires_grad=False)
        for name, p in module._parameters.items()
    }
    clone._buffers = {
        name: None if b is None else b.to(device, non_blocking=non_blocking, copy=True)
        for name, b in module._buffers.items()
    }
    clone._modules = {
        name: None if m is None else clone_to(m, device, non_blocking) for name, m in module._modules.items()
    }
    if type(clone)._apply is not nn.Module._apply:
        clone._apply(lambda t: t.to(device))
    return clone


def pin(module: nn.Module) -> nn.Module:
    """Put the module's CPU tensors in page-locked memory, so copies to the GPU can be asynchronous."""
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None:
                sub._parameters[name] = nn.Parameter(p.detach().pin_memory(), requires_grad=False)
        for name, b in sub._buffers.items():
            if b is not None:
                sub._buffers[name] = b.pin_memory()
    return module


# --- where experts come from -------------------------------------------------------------------


class Source(abc.ABC):
    """Experts in host memory; a source that reads them from somewhere counts the bytes in ``stats``."""

    stats: StoreStats | None = None

    def count_into(self, stats: StoreStats) -> None:
        self.stats = stats

    @abc.abstractmethod
    def module(self, layer: int, expert: int) -> nn.Module: ...

    @abc.abstractmethod
    def nbytes(self, layer: int, expert: int) -> int: ...

    def release(self, layer: int, expert: int) -> None:
        """The store evicted this expert: memory the source lent it may be reused."""

    def files(self) -> list[Path]:
        """The files experts are read from (none: they are in memory)."""
        return []

    def close(self) -> None:
        """Release files and memory."""


class ResidentSource(Source):
    """Every expert held in RAM (pinned when a CUDA device will copy from it)."""

    def __init__(self, modules: dict[Key, nn.Module], pinned: bool = False) -> None:
        self.modules = {k: pin(m) for k, m in modules.items()} if pinned else modules
        self._bytes = {k: module_bytes(m) for k, m in self.modules.items()}

    def module(self, layer: int, expert: int) -> nn.Module:
        return self.modules[(layer, expert)]

    def nbytes(self, layer: int, expert: int) -> int:
        return self._bytes[(layer, expert)]


class DiskSource(Source):
    """Every expert on disk, read in full on each fetch (the caller decides what to keep)."""

    def __init__(self, disk: DiskExperts, pinned: bool = False) -> None:
        self.disk = disk
        self.pinned = pinned

    def module(self, layer: int, expert: int) -> nn.Module:
        if self.stats is not None:
            self.stats.moved("disk->ram", self.disk.nbytes(layer, expert))
        with building_detached():  # a new module, reachable from no decode plan yet
            built = self.disk.build(layer, expert)
            return pin(built) if self.pinned else built

    def nbytes(self, layer: int, expert: int) -> int:
        return self.disk.nbytes(layer, expert)

    def files(self) -> list[Path]:
        return self.disk.files()

    def close(self) -> None:
        self.disk.close()


class PackedSource(Source):
    """Every expert in an expert pack on disk, read on a miss into a fixed slot (``pack.ExpertSlots``):
    one direct read, no repack, no page-cache copy, no new memory."""

    def __init__(self, slots: ExpertSlots) -> None:
        self.slots = slots

    def module(self, layer: int, expert: int) -> nn.Module:
        if self.stats is None:
            return self.slots.fill(layer, expert)
        with self.stats.transfer("disk->ram", self.slots.nbytes()):
            return self.slots.fill(layer, expert)

    def nbytes(self, layer: int, expert: int) -> int:
        return self.slots.nbytes()

    def release(self, layer: int, expert: int) -> None:
        self.slots.release(layer, expert)

    def files(self) -> list[Path]:
        return [self.slots.reader.entry / DATA]

    def close(self) -> None:
        self.slots.close()


class RamCachedSource(Source):
    """A bounded RAM cache of experts in front of the disk (between a GPU's slots and the disk)."""

    def __init__(self, disk: Source, slots: int, policy: str) -> None:
        self.disk = disk
        self.slots = slots
        self.policy = policy
        self.caches: dict[int, LayerCache] = {}
        self.modules: dict[Key, nn.Module] = {}

    def module(self, layer: int, expert: int) -> nn.Module:
        cache = self.caches.setdefault(layer, LayerCache(self.slots, self.policy))
        hit, evicted = cache.access(expert)
        for gone in evicted:
            self.modules.pop((layer, gone), None)
        if not hit:
            self.modules[(layer, expert)] = self.disk.module(layer, expert)
        return self.modules[(layer, expert)]

    def nbytes(self, layer: int, expert: int) -> int:
        return self.disk.nbytes(layer, expert)

    def count_into(self, stats: StoreStats) -> None:
        self.disk.count_into(stats)

    def files(self) -> list[Path]:
        return self.disk.files()

    def close(self) -> None:
        self.modules.clear()
        self.disk.close()


# --- how an expert gets into a slot on the compute device ----------------------------------------


class Slot(abc.ABC):
    """An expert on its way to (or already in) a compute-device slot."""

    @abc.abstractmethod
    def ready(self) -> nn.Module:
        """The module, once it may be used by the compute stream."""


class ReadySlot(Slot):
    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def ready(self) -> nn.Module:
        return self.module


class FutureSlot(Slot):
    """Being built on a worker thread (a disk read, which releases the GIL)."""

    def __init__(self, future: "Future[nn.Module]") -> None:
        self.future = future

    def ready(self) -> nn.Module:
        return self.future.result()


class CudaSlot(Slot):
    """Being copied on a side stream; the compute stream waits for the copy's event."""

    def __init__(self, module: nn.Module, event: "torch.cuda.Event", device: torch.device) -> None:
        self.module = module
        self.event = event
        self.device = device
        self.waited = False

    def ready(self) -> nn.Module:
        if not self.waited:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(self.event)
            # Memory allocated on the copy stream is used on the compute stream from here on.
            for t in [*self.module.parameters(), *self.module.buffers()]:
                t.record_stream(stream)
            self.waited = True
        return self.module


class Transfer(abc.ABC):
    """Starts putting a host-memory expert into a device slot. ``link`` names the hop (None: no copy)."""

    link: str | None = None

    @abc.abstractmethod
    def start(self, source: Source, layer: int, expert: int, ahead: bool) -> Slot:
        """``ahead`` is True for a prefetch, which may run in the background."""

    def close(self) -> None:
        """Stop background work."""


class InPlace(Transfer):
    """The source's memory is the slot (CPU compute); reads started ahead run on worker threads."""

    def __init__(self, background: bool) -> None:
        self.pool = ThreadPoolExecutor(READ_WORKERS, thread_name_prefix="dsmoe-read") if background else None

    def start(self, source: Source, layer: int, expert: int, ahead: bool) -> Slot:
        if ahead and self.pool is not None:
            return FutureSlot(self.pool.submit(source.module, layer, expert))
        return ReadySlot(source.module(layer, expert))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


class HostCopy(Transfer):
    """A real copy within RAM: a stand-in for a device, so the CPU runs the GPU's decisions."""

    def __init__(self, name: str = "cpu") -> None:
        self.link = f"ram->{name}"

    def start(self, source: Source, layer: int, expert: int, ahead: bool) -> Slot:
        module = source.module(layer, expert)
        with building_detached():  # the copy is reachable from no decode plan yet
            return ReadySlot(clone_to(module, torch.device("cpu")))


class CudaCopy(Transfer):
    """Copy from pinned RAM to the GPU on a side stream, overlapping the current layer's compute."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.link = f"ram->{device}"
        self.stream = torch.cuda.Stream(device)

    def start(self, source: Source, layer: int, expert: int, ahead: bool) -> Slot:
        host = source.module(layer, expert)
        # The copy must not start before the compute stream is done with the memory it reuses.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            module = clone_to(host, self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return CudaSlot(module, event, self.device)


# --- run a miss where it is, or move it? ---------------------------------------------------------


@dataclass(frozen=True)
class CostModel:
    """Whether running a missing expert on the CPU beats copying it to the GPU, at this batch size.

    A copy costs the expert's bytes over the link; a CPU run costs reading the weights once from
    RAM plus the matmuls for the tokens. Defaults: PCIe 4.0 x16 with pinned memory, a desktop's
    memory bandwidth and bf16 throughput; measure yours and pass them in.
    """

    link_bytes_per_s: float = 20e9
    host_bytes_per_s: float = 30e9
    host_flops: float = 1e12

    def run_on_host(self, tokens: int, expert_bytes: int, expert_params: int) -> bool:
        copy_s = expert_bytes / self.link_bytes_per_s
        host_s = expert_bytes / self.host_bytes_per_s + 2 * expert_params * tokens / self.host_flops
        return host_s < copy_s


# --- the store ---------------------------------------------------------------------------------


class ExpertStore:
    """Runs every routed expert of ``model`` from the slots of its compute device.

    ``store.stats`` counts hits, misses, prefetch accuracy and bytes per link; ``detach`` hands the
    model back its channel (the experts stay with the store).
    """

    def __init__(
        self,
        model: DeepseekForCausalLM,
        plan: Plan,
        source: Source,
        transfer: Transfer,
        policy: str = "lru",
        prefetch: bool = True,
        cost: CostModel | None = None,
    ) -> None:
        self.model = model
        self.plan = plan
        self.source = source
        self.transfer = transfer
        self.policy = policy
        self.prefetch_enabled = prefetch
        self.cost = cost
        self.device = model.device
        self.stats = StoreStats()
        source.count_into(self.stats)
        moes = model.moe_layers()
        self.schedule = Schedule(plan.moe_layers, plan.n_experts, plan.device_slots, policy, prefetch,
                                 self.stats, self)
        self.caches = self.schedule.caches
        self.slots: dict[Key, Slot] = {}
        config = model.config
        self._expert_params = 3 * config.hidden_size * config.moe_intermediate_size
        self._gates = {moe.layer_idx: moe.gate for moe in moes}
        model.experts_channel.hold(self)
        if plan.device_slots >= plan.n_experts:
            for layer, cache in self.caches.items():
                for expert in range(plan.n_experts):
                    cache.prefetch(expert)
                    self.slots[(layer, expert)] = transfer.start(source, layer, expert, ahead=False)

    def routed(self, layer: int, x: torch.Tensor, ids: torch.Tensor) -> None:
        """The routing of one forward pass of ``layer`` (its tokens ``x``), before its experts run.

        Where the pass fits the slots (and no cost model may send a miss to the host), every miss's
        read starts here, all at once, before the next layer's prefetch; ``run`` then only waits.
        """
        needed = set(ids.reshape(-1).tolist())  # torch.unique costs ~0.1 ms, a decode step's whole budget here
        self.schedule.routed(layer, needed, ids.shape[0], may_serve=self.cost is None)
        following = self.schedule.following(layer)
        if following is not None:
            # The next layer's router on this layer's input: the residual stream changes little
            # from one layer to the next, so its top-k is a good guess of the next routing.
            next_ids, _ = self._gates[following](x)
            self.model.experts_channel.guessed(following, next_ids)
            self.prefetch(following, next_ids)

    def prefetch(self, layer: int, ids: torch.Tensor) -> None:
        """Start bringing in the experts ``ids`` names for ``layer``, most-named first, up to its slots."""
        self.schedule.prefetch(layer, ids.reshape(-1).tolist())

    def drop(self, layer: int, experts: list[int]) -> None:
        for expert in experts:
            slot = self.slots.pop((layer, expert), None)
            if isinstance(slot, FutureSlot):
                slot.future.result()  # a read still landing in memory the source is about to reuse
            self.source.release(layer, expert)

    def fill(self, layer: int, expert: int, ahead: bool) -> None:
        if self.transfer.link is not None:
            self.stats.moved(self.transfer.link, self.source.nbytes(layer, expert))
        self.slots[(layer, expert)] = self.transfer.start(self.source, layer, expert, ahead)

    def host_is_cheaper(self, layer: int, expert: int, tokens: int) -> bool:
        if self.cost is None:
            return False
        return self.cost.run_on_host(tokens, self.source.nbytes(layer, expert), self._expert_params)

    def run(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``expert`` of ``layer`` on its tokens ``x``, from its slot (brought in on a miss)."""
        if self.schedule.served(layer):
            return self.slots[(layer, expert)].ready()(x)
        if expert not in self.caches[layer] and self.host_is_cheaper(layer, expert, x.shape[0]):
            self.schedule.run_elsewhere(layer, expert)
            host = self.source.module(layer, expert)
            return host(x.to(_device_of(host))).to(x.device)
        self.schedule.use(layer, expert)
        return self.slots[(layer, expert)].ready()(x)

    def serves_native(self, layer: int, top_k: int) -> bool:
        """The native decode step may ask for a token's experts at once: CPU compute, no cost model
        deciding per expert, and slots for all ``top_k`` (so serving one cannot evict another)."""
        return self.device.type == "cpu" and self.cost is None and self.caches[layer].capacity >= top_k

    def native_experts(self, layer: int, x: torch.Tensor, ids: torch.Tensor) -> list[SwiGLUKernel]:
        """``routed`` for one token, then its experts' one-token kernels in ``ids``' order (hits
        from their slots, misses once read): the native decode step runs them."""
        self.routed(layer, x, ids)
        kernels = []
        for expert in ids[0].tolist():
            module = self.slots[(layer, expert)].ready()
            kernel = module.one_token_kernel() if isinstance(module, MLP) else None
            if kernel is None:
                raise RuntimeError(f"expert {expert} of layer {layer} has no native kernel")
            kernels.append(kernel)
        return kernels

    def served_experts(self, layer: int, experts: Sequence[int]) -> list[nn.Module] | None:
        """The slots' modules of ``experts`` when this pass of ``layer`` was served in ``routed`` (what
        ``run`` would hand each of them), else None."""
        if not self.schedule.served(layer):
            return None
        return [self.slots[(layer, expert)].ready() for expert in experts]

    def resident(self, layer: int) -> list[int]:
        """The experts of ``layer`` in device slots now, ascending."""
        return sorted(self.caches[layer].resident)

    def detach(self) -> None:
        """Let go of the model and release the tiers; the model cannot run its experts afterwards."""
        if self.model.experts_channel.holder is self:
            self.model.experts_channel.hold(None)
        self.slots.clear()
        self.transfer.close()
        self.source.close()


def _device_of(module: nn.Module) -> torch.device:
    for t in [*module.parameters(), *module.buffers()]:
        return t.device
    return torch.device("cpu")
