"""Counters of an expert store: what hit, what missed, what the prefetcher guessed, what moved."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field


@dataclass
class LayerStats:
    """One MoE layer. An access is one expert used by one forward pass (whatever its token count)."""

    hits: int = 0
    misses: int = 0
    host_runs: int = 0
    """Misses run where the expert lives (the CPU) instead of being copied in."""
    predicted: int = 0
    """Experts the prefetcher named for this layer."""
    predicted_used: int = 0
    """Of those, how many the layer then really routed to."""
    prefetched: int = 0
    """Copies the prefetcher started (named experts that were not already resident)."""

    @property
    def accesses(self) -> int:
        return self.hits + self.misses


@dataclass
class StoreStats:
    """Per-layer counters plus bytes moved over each link (``disk->ram``, ``ram->cuda:0``, ...)."""

    layers: dict[int, LayerStats] = field(default_factory=dict)
    link_bytes: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    link_busy_seconds: dict[str, float] = field(default_factory=dict)
    """Per link, the time during which at least one transfer over it was in flight (reads overlap)."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _in_flight: dict[str, tuple[int, float]] = field(default_factory=dict, repr=False, compare=False)

    def layer(self, idx: int) -> LayerStats:
        return self.layers.setdefault(idx, LayerStats())

    def moved(self, link: str, nbytes: int) -> None:
        # Also called from the prefetch thread, which reads from disk while a layer computes.
        with self._lock:
            self.link_bytes[link] = self.link_bytes.get(link, 0) + nbytes

    @contextlib.contextmanager
    def transfer(self, link: str, nbytes: int) -> Iterator[None]:
        """Count ``nbytes`` over ``link`` and the time the transfer inside takes, overlapping ones once."""
        with self._lock:
            count, since = self._in_flight.get(link, (0, 0.0))
            self._in_flight[link] = (count + 1, since if count else time.perf_counter())
        try:
            yield
        finally:
            with self._lock:
                count, since = self._in_flight[link]
                if count == 1:
                    del self._in_flight[link]
                    self.link_busy_seconds[link] = self.link_busy_seconds.get(link, 0.0) + time.perf_counter() - since
                else:
                    self._in_flight[link] = (count - 1, since)
                self.link_bytes[link] = self.link_bytes.get(link, 0) + nbytes

    def link_bandwidth(self, link: str) -> float | None:
        """Bytes per second over ``link`` while it was busy (None before any timed transfer)."""
        busy = self.link_busy_seconds.get(link)
        return self.link_bytes.get(link, 0) / busy if busy else None

    def _sum(self, name: str, layer: int | None) -> int:
        chosen = [self.layers[layer]] if layer is not None else self.layers.values()
        return sum(getattr(s, name) for s in chosen)

    def hits(self, layer: int | None = None) -> int:
        return self._sum("hits", layer)

    def misses(self, layer: int | None = None) -> int:
        return self._sum("misses", layer)

    def hit_rate(self, layer: int | None = None) -> float:
        """Hits over accesses (0 before any access)."""
        hits, misses = self.hits(layer), self.misses(layer)
        return hits / (hits + misses) if hits + misses else 0.0

    def prefetch_accuracy(self, layer: int | None = None) -> float:
        """The share of predicted experts that the layer then used (0 with no predictions)."""
        predicted = self._sum("predicted", layer)
        return self._sum("predicted_used", layer) / predicted if predicted else 0.0

    def bytes_per_token(self, link: str | None = None) -> float:
        """Bytes moved per processed token over one link, or over all of them."""
        if not self.tokens:
            return 0.0
        moved = self.link_bytes.get(link, 0) if link is not None else sum(self.link_bytes.values())
        return moved / self.tokens

    def reset(self) -> None:
        self.layers.clear()
        self.link_bytes.clear()
        self.link_busy_seconds.clear()
        self.tokens = 0

    def as_dict(self) -> dict[str, object]:
        """Plain data for JSON output and for other commands' stats displays."""
        return {
            "tokens": self.tokens,
            "hit_rate": self.hit_rate(),
            "prefetch_accuracy": self.prefetch_accuracy(),
            "bytes_per_token": {link: self.bytes_per_token(link) for link in self.link_bytes},
            "link_bytes_per_s": {link: self.link_bandwidth(link) for link in self.link_busy_seconds},
            "layers": {idx: asdict(s) for idx, s in sorted(self.layers.items())},
        }
