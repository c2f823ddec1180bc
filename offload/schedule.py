"""The expert store's decisions, apart from its I/O: which expert hits, which is read and when, which leaves.

``ExpertStore`` acts on them (its reads and releases are the ``Mover``); ``simulate`` replays a
routing trace through the same object with a mover that only counts, so a simulated run and a real
run with the same slots, policy and prefetch count the same hits, misses and reads by construction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Protocol

from dsmoe.offload.policies import LayerCache
from dsmoe.offload.stats import StoreStats

READ_WORKERS = 4
"""Expert reads in flight at once: a layer's misses (~3 at the 16B geometry) and the next layer's
prefetch together; one request at a time left the disk idle between reads (docs/PERFORMANCE.md).
A pass bigger than the slots reads this many of its experts ahead of use."""


class Mover(Protocol):
    """What carries out the schedule's decisions."""

    def fill(self, layer: int, expert: int, ahead: bool) -> None:
        """Bring ``expert`` of ``layer`` into its slot (``ahead``: it may land in the background)."""

    def drop(self, layer: int, experts: list[int]) -> None:
        """Free the slots of ``experts`` of ``layer``."""


class Schedule:
    """Per MoE layer a ``LayerCache`` of ``slots`` experts, and the order in which the store uses it.

    A pass whose experts fit the slots is served at once (every miss read together); a bigger one
    (a prompt) announces its experts and uses them once each, ascending, with ``READ_WORKERS`` read
    ahead. With ``prefetch``, the next layer's guessed experts are read while a layer computes.
    """

    def __init__(self, moe_layers: list[int], n_experts: int, slots: int, policy: str, prefetch: bool,
                 stats: StoreStats, mover: Mover) -> None:
        self.n_experts = n_experts
        self.prefetch_enabled = prefetch
        self.stats = stats
        self.mover = mover
        self.caches = {layer: LayerCache(slots, policy) for layer in moe_layers}
        self.first_layer = moe_layers[0]
        self._following: dict[int, int] = {}
        if prefetch and slots < n_experts:  # where guessing the next layer's routing can pay
            self._following = dict(zip(moe_layers, moe_layers[1:]))
        self._predicted: dict[int, set[int]] = {}
        self._served: dict[int, bool] = {}  # per layer: its current pass was served in ``routed``
        self._ahead_order: dict[int, list[int]] = {}  # per layer: a big pass's experts yet to run
        self._read_early: set[tuple[int, int]] = set()  # read ahead for the current pass, not yet run

    def following(self, layer: int) -> int | None:
        """The MoE layer whose experts to prefetch while ``layer`` computes (None: no prefetch)."""
        return self._following.get(layer)

    def served(self, layer: int) -> bool:
        """Whether ``layer``'s current pass was served whole in ``routed``."""
        return self._served.get(layer, False)

    def routed(self, layer: int, needed: set[int], tokens: int, may_serve: bool = True) -> bool:
        """A forward pass of ``tokens`` tokens routed to ``needed``: serve it now if it fits the slots
        (and ``may_serve``: no cost model decides per expert), else announce it. Returns whether served."""
        if layer == self.first_layer:
            self.stats.tokens += tokens
        stats = self.stats.layer(layer)
        predicted = self._predicted.pop(layer, None)
        if predicted is not None:
            stats.predicted += len(predicted)
            stats.predicted_used += len(predicted & needed)
        cache = self.caches[layer]
        served = may_serve and len(needed) <= cache.capacity
        self._served[layer] = served
        self._ahead_order.pop(layer, None)
        if served:
            for expert, hit, evicted in cache.serve(sorted(needed)):
                self.mover.drop(layer, evicted)
                if hit:
                    stats.hits += 1
                else:
                    stats.misses += 1
                    self.mover.fill(layer, expert, ahead=True)
        else:
            cache.begin(needed)
            if self.prefetch_enabled and may_serve:
                # Bigger than the slots (a prompt): read the next experts of the pass ahead of use.
                self._ahead_order[layer] = sorted(needed)
                self._read_ahead(layer)
        return served

    def use(self, layer: int, expert: int) -> None:
        """One expert of a pass that was not served whole, about to run: read it now on a miss."""
        cache = self.caches[layer]
        stats = self.stats.layer(layer)
        order = self._ahead_order.get(layer)
        if order and order[0] == expert:
            order.pop(0)
        hit, evicted = cache.access(expert)
        self.mover.drop(layer, evicted)
        if hit and (layer, expert) not in self._read_early:
            stats.hits += 1
        else:
            stats.misses += 1  # read for this pass: now, or ahead by _read_ahead
            self._read_early.discard((layer, expert))
            if not hit:
                self.mover.fill(layer, expert, ahead=False)
        if order:
            self._read_ahead(layer, keep=expert)

    def run_elsewhere(self, layer: int, expert: int) -> None:
        """A miss run where the expert lives instead of being brought in (the cost model's choice)."""
        self.caches[layer].access(expert, admit=False)
        stats = self.stats.layer(layer)
        stats.misses += 1
        stats.host_runs += 1

    def prefetch(self, layer: int, guessed: Iterable[int]) -> None:
        """Start bringing in the experts ``guessed`` names for ``layer`` (one entry per token and
        choice), most-named first, up to its slots."""
        cache = self.caches[layer]
        counts = Counter(guessed)
        chosen = sorted(counts, key=lambda e: (-counts[e], e))[: cache.capacity]
        self._predicted[layer] = set(chosen)
        cache.begin(set(chosen))
        stats = self.stats.layer(layer)
        for expert in chosen:
            if expert in cache:
                continue
            evicted = cache.prefetch(expert)
            if evicted is None:
                break
            self.mover.drop(layer, evicted)
            self.mover.fill(layer, expert, ahead=True)
            stats.prefetched += 1

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
            self.mover.drop(layer, evicted)
            self.mover.fill(layer, expert, ahead=True)
            self._read_early.add((layer, expert))
