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
in ``policies.LayerCache``, whatever the tiers are.
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

from dsmoe.model.deepseek import MLP, DeepseekForCausalLM, MoE
from dsmoe.model.layer_plan import building_detached
from dsmoe.quant.linear import SwiGLUKernel
from dsmoe.offload.disk import DiskExperts
from dsmoe.offload.pack import DATA, ExpertSlots
from dsmoe.offload.plan import Plan
from dsmoe.offload.policies import LayerCache
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


READ_WORKERS = 4
"""Expert reads in flight at once: a layer's misses (~3 at the 16B geometry) and the next layer's
prefetch together; one request at a time left the disk idle between reads (docs/PERFORMANCE.md)."""


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
        self.caches = {layer: LayerCache(plan.device_slots, policy) for layer in plan.moe_layers}
        self.slots: dict[Key, Slot] = {}
        self._predicted: dict[int, set[int]] = {}
        self._served: dict[int, bool] = {}  # per layer: its current pass was served in ``routed``
        self._ahead_order: dict[int, list[int]] = {}  # per layer: a big pass's experts yet to run
        self._read_early: set[Key] = set()  # read ahead for the current pass, not yet run
        config = model.config
        self._expert_params = 3 * config.hidden_size * config.moe_intermediate_size
        moes = model.moe_layers()
        self._first_layer = moes[0].layer_idx
        # The layer whose gate guesses each layer's next routing, where prefetching can pay.
        self._following: dict[int, MoE] = {}
        if prefetch and plan.device_slots < plan.n_experts:
            self._following = {moe.layer_idx: following for moe, following in zip(moes, moes[1:])}
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
        if layer == self._first_layer:
            self.stats.tokens += ids.shape[0]
        stats = self.stats.layer(layer)
        predicted = self._predicted.pop(layer, None)
        if predicted is not None:
            stats.predicted += len(predicted)
            stats.predicted_used += len(predicted & needed)
        cache = self.caches[layer]
        self._served[layer] = self.cost is None and len(needed) <= cache.capacity
        self._ahead_order.pop(layer, None)
        if self._served[layer]:
            for expert, hit, evicted in cache.serve(sorted(needed)):
                self._drop(layer, evicted)
                if hit:
                    stats.hits += 1
                else:
                    stats.misses += 1
                    self._fill(layer, expert, ahead=True)
        else:
            cache.begin(needed)
            if self.prefetch_enabled and self.cost is None:
                # Bigger than the slots (a prompt): read the next experts of the pass ahead of use.
                self._ahead_order[layer] = sorted(needed)
                self._read_ahead(layer)
        following = self._following.get(layer)
        if following is not None:
            # The next layer's router on this layer's input: the residual stream changes little
            # from one layer to the next, so its top-k is a good guess of the next routing.
            next_ids, _ = following.gate(x)
            self.prefetch(following.layer_idx, next_ids)

    def prefetch(self, layer: int, ids: torch.Tensor) -> None:
        """Start bringing in the experts ``ids`` names for ``layer``, most-named first, up to its slots."""
        cache = self.caches[layer]
        counts = torch.bincount(ids.reshape(-1), minlength=self.plan.n_experts).tolist()
        ranked = sorted((e for e, c in enumerate(counts) if c), key=lambda e: (-counts[e], e))
        chosen = ranked[: cache.capacity]
        self._predicted[layer] = set(chosen)
        cache.begin(set(chosen))
        stats = self.stats.layer(layer)
        for expert in chosen:
            if expert in cache:
                continue
            evicted = cache.prefetch(expert)
            if evicted is None:
                break
            self._drop(layer, evicted)
            self._fill(layer, expert, ahead=True)
            stats.prefetched += 1

    def _drop(self, layer: int, experts: list[int]) -> None:
        for expert in experts:
            slot = self.slots.pop((layer, expert), None)
            if isinstance(slot, FutureSlot):
                slot.future.result()  # a read still landing in memory the source is about to reuse
            self.source.release(layer, expert)

    def _read_ahead(self, layer: int, keep: int | None = None) -> None:
        """Start reading the next ``READ_WORKERS`` missing experts of a pass bigger than the slots,
        into slots no unused expert of the pass holds (``keep``: the expert about to run)."""
        cache = self.caches[layer]
        for expert in self._ahead_order.get(layer, [])[:READ_WORKERS]:
            if expert in cache:
                continue
            evicted = cache.prefetch(expert, keep=keep)
            if evicted is None:
                break
            self._drop(layer, evicted)
            self._fill(layer, expert, ahead=True)
            self._read_early.add((layer, expert))

    def _fill(self, layer: int, expert: int, ahead: bool) -> None:
        if self.transfer.link is not None:
            self.stats.moved(self.transfer.link, self.source.nbytes(layer, expert))
        self.slots[(layer, expert)] = self.transfer.start(self.source, layer, expert, ahead)

    def host_is_cheaper(self, layer: int, expert: int, tokens: int) -> bool:
        if self.cost is None:
            return False
        return self.cost.run_on_host(tokens, self.source.nbytes(layer, expert), self._expert_params)

    def run(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``expert`` of ``layer`` on its tokens ``x``, from its slot (brought in on a miss)."""
        if self._served.get(layer):
            return self.slots[(layer, expert)].ready()(x)
        cache = self.caches[layer]
        stats = self.stats.layer(layer)
        if expert not in cache and self.host_is_cheaper(layer, expert, x.shape[0]):
            cache.access(expert, admit=False)
            stats.misses += 1
            stats.host_runs += 1
            host = self.source.module(layer, expert)
            return host(x.to(_device_of(host))).to(x.device)
        order = self._ahead_order.get(layer)
        if order and order[0] == expert:
            order.pop(0)
        hit, evicted = cache.access(expert)
        self._drop(layer, evicted)
        if hit and (layer, expert) not in self._read_early:
            stats.hits += 1
        else:
            stats.misses += 1  # read for this pass: now, or ahead by _read_ahead
            self._read_early.discard((layer, expert))
            if not hit:
                self._fill(layer, expert, ahead=False)
        if order:
            self._read_ahead(layer, keep=expert)
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
        if not self._served.get(layer):
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
