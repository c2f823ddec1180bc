"""Replay a routing trace under each policy and cache size: hit rates without running the model.

The replay drives the store's own ``Schedule`` (offload/schedule.py) with a mover that only
counts, so a simulated run and a real run with the same policy, slots and prefetch count the same
hits, misses and reads. Prefetch replays the guesses a trace recorded (a run whose expert store
prefetched); without them only the read-ahead within a prompt is replayed.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsmoe.errors import UsageError
from dsmoe.offload.policies import POLICIES
from dsmoe.offload.schedule import Schedule
from dsmoe.offload.stats import StoreStats
from dsmoe.offload.trace import Trace


@dataclass(frozen=True)
class SimResult:
    policy: str
    slots: int
    hits: int
    misses: int
    tokens: int
    bytes_moved: int
    prefetched: int = 0
    """Experts read on a guess of the next layer's routing (counted in ``bytes_moved``)."""
    decode_hits: int = 0
    decode_misses: int = 0
    """Of ``hits`` and ``misses``, those of one-token passes (decode steps)."""
    decode_tokens: int = 0
    decode_bytes_moved: int = 0
    """Of ``bytes_moved``, what decode steps read: their misses and their prefetches, right or wrong."""

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def decode_hit_rate(self) -> float | None:
        """The hit rate of decode steps alone (None: the trace has none), what decode speed depends on."""
        total = self.decode_hits + self.decode_misses
        return self.decode_hits / total if total else None

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_moved / self.tokens if self.tokens else 0.0

    @property
    def decode_bytes_per_token(self) -> float | None:
        """Bytes a decode step reads (None: the trace has none): a prediction of decode speed needs
        this rather than misses x expert size, because a wrong guess is read too."""
        return self.decode_bytes_moved / self.decode_tokens if self.decode_tokens else None


class _Reads:
    """A mover that counts the reads a schedule asks for."""

    def __init__(self) -> None:
        self.reads = 0

    def fill(self, layer: int, expert: int, ahead: bool) -> None:
        self.reads += 1

    def drop(self, layer: int, experts: list[int]) -> None:
        pass


def simulate(trace: Trace, policy: str, slots: int, prefetch: bool = True) -> SimResult:
    """One policy with ``slots`` experts per layer, starting cold; ``prefetch`` as the store's option."""
    if slots < 1:
        raise UsageError(f"a cache needs at least 1 slot per layer, got {slots}")
    head = trace.header
    stats, reads = StoreStats(), _Reads()
    schedule = Schedule(head.moe_layers, head.n_experts, slots, policy, prefetch, stats, reads)
    decode_hits = decode_misses = decode_tokens = decode_reads = 0
    for event in trace.events:
        reads_before = reads.reads
        if event.guess is not None and schedule.following(_previous(head.moe_layers, event.layer)) == event.layer:
            schedule.prefetch(event.layer, [e for row in event.guess for e in row])
        needed = {e for row in event.ids for e in row}
        layer = stats.layer(event.layer)
        hits, misses = layer.hits, layer.misses
        if not schedule.routed(event.layer, needed, len(event.ids)):
            for expert in sorted(needed):
                schedule.use(event.layer, expert)
        if len(event.ids) == 1:
            decode_hits += layer.hits - hits
            decode_misses += layer.misses - misses
            decode_reads += reads.reads - reads_before
            decode_tokens += event.layer == head.moe_layers[0]
    prefetched = sum(layer.prefetched for layer in stats.layers.values())
    return SimResult(policy, slots, stats.hits(), stats.misses(), trace.tokens, reads.reads * head.expert_bytes,
                     prefetched, decode_hits, decode_misses, decode_tokens, decode_reads * head.expert_bytes)


def _previous(moe_layers: list[int], layer: int) -> int:
    """The MoE layer before ``layer`` (whose pass guessed its routing); ``layer`` itself for the first."""
    at = moe_layers.index(layer)
    return moe_layers[at - 1] if at else layer


def default_sizes(trace: Trace) -> list[int]:
    """Powers of two from 1 up to (not including) all experts, plus top-k: the interesting range."""
    n, sizes, size = trace.header.n_experts, {trace.header.top_k}, 1
    while size < n:
        sizes.add(size)
        size *= 2
    return sorted(s for s in sizes if 1 <= s < n)


def sweep(trace: Trace, policies: list[str] | None = None, sizes: list[int] | None = None,
          prefetch: bool = True) -> list[SimResult]:
    """Every policy at every size, in that order."""
    chosen = policies or list(POLICIES)
    for name in chosen:
        if name not in POLICIES:
            raise UsageError(f"unknown cache policy {name!r} (choose {' or '.join(POLICIES)})")
    n = trace.header.n_experts
    for size in sizes or []:
        if not 1 <= size <= n:
            raise UsageError(f"slots must be between 1 and the trace's {n} experts per layer, got {size}")
    return [simulate(trace, policy, slots, prefetch) for policy in chosen
            for slots in (sizes or default_sizes(trace))]
