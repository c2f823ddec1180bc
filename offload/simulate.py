"""Replay a routing trace under each policy and cache size: hit rates without running the model.

The replay drives the store's own ``LayerCache`` in the store's order (a forward pass whose experts
fit the slots is served at once, ``LayerCache.serve``; a bigger one announces its experts, then uses
them once each, ascending), so without prefetch a simulated run and a real run with the same
policy and slots count the same hits.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsmoe.errors import UsageError
from dsmoe.offload.policies import POLICIES, LayerCache
from dsmoe.offload.trace import Trace


@dataclass(frozen=True)
class SimResult:
    policy: str
    slots: int
    hits: int
    misses: int
    tokens: int
    bytes_moved: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_moved / self.tokens if self.tokens else 0.0


def simulate(trace: Trace, policy: str, slots: int) -> SimResult:
    """One policy with ``slots`` experts per layer, starting cold."""
    if slots < 1:
        raise UsageError(f"a cache needs at least 1 slot per layer, got {slots}")
    caches = {layer: LayerCache(slots, policy) for layer in trace.header.moe_layers}
    hits = misses = 0
    for layer, ids in trace.events:
        needed = sorted({e for row in ids for e in row})
        cache = caches[layer]
        if len(needed) <= slots:  # as the store serves a pass that fits its slots
            outcomes = [hit for _, hit, _ in cache.serve(needed)]
        else:
            cache.begin(set(needed))
            outcomes = [cache.access(expert)[0] for expert in needed]
        hits += sum(outcomes)
        misses += len(outcomes) - sum(outcomes)
    return SimResult(policy, slots, hits, misses, trace.tokens, misses * trace.header.expert_bytes)


def default_sizes(trace: Trace) -> list[int]:
    """Powers of two from 1 up to (not including) all experts, plus top-k: the interesting range."""
    n, sizes, size = trace.header.n_experts, {trace.header.top_k}, 1
    while size < n:
        sizes.add(size)
        size *= 2
    return sorted(s for s in sizes if 1 <= s < n)


def sweep(trace: Trace, policies: list[str] | None = None, sizes: list[int] | None = None) -> list[SimResult]:
    """Every policy at every size, in that order."""
    chosen = policies or list(POLICIES)
    for name in chosen:
        if name not in POLICIES:
            raise UsageError(f"unknown cache policy {name!r} (choose {' or '.join(POLICIES)})")
    n = trace.header.n_experts
    for size in sizes or []:
        if not 1 <= size <= n:
            raise UsageError(f"slots must be between 1 and the trace's {n} experts per layer, got {size}")
    return [simulate(trace, policy, slots) for policy in chosen for slots in (sizes or default_sizes(trace))]
