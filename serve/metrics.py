"""``GET /metrics``: Prometheus counters for requests and tokens, the queue, and the expert cache."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from dsmoe.offload import ExpertStore
    from dsmoe.serve.engine import Finished


class _ExpertCollector(Collector):
    """The expert store's counters, read when scraped (they live in the store, not here)."""

    def __init__(self, store: "ExpertStore") -> None:
        self.store = store

    def collect(self) -> Iterator[CounterMetricFamily]:
        stats, tier = self.store.stats, str(self.store.plan.compute)
        hits = CounterMetricFamily("dsmoe_expert_cache_hits", "Routed experts found in the compute tier", labels=["tier"])
        hits.add_metric([tier], stats.hits())
        misses = CounterMetricFamily("dsmoe_expert_cache_misses", "Routed experts fetched from a lower tier",
                                     labels=["tier"])
        misses.add_metric([tier], stats.misses())
        moved = CounterMetricFamily("dsmoe_expert_bytes_moved", "Expert bytes copied between tiers", labels=["link"])
        for link, nbytes in sorted(stats.link_bytes.items()):
            moved.add_metric([link], nbytes)
        yield from (hits, misses, moved)


class Metrics:
    """Counters on their own registry, so two servers in one process never share them."""

    def __init__(self, queue_depth: Callable[[], int], running: Callable[[], int],
                 store: "ExpertStore | None" = None) -> None:
        disable_created_metrics()  # the *_created series say when the process started: noise on every scrape
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dsmoe_requests", "Requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("dsmoe_prompt_tokens", "Prompt tokens of finished generations", registry=r)
        self.reused_tokens = Counter("dsmoe_prompt_tokens_reused", "Prompt tokens found in the KV cache", registry=r)
        self.completion_tokens = Counter("dsmoe_completion_tokens", "Tokens generated", registry=r)
        self.seconds = Counter("dsmoe_generation_seconds", "Time spent generating", registry=r)
        self.tokens_per_second = Gauge("dsmoe_tokens_per_second", "Decode speed of the last generation", registry=r)
        Gauge("dsmoe_queue_depth", "Requests waiting for their turn", registry=r).set_function(queue_depth)
        Gauge("dsmoe_requests_running", "Requests being generated", registry=r).set_function(running)
        if store is not None:
            r.register(_ExpertCollector(store))

    def finished(self, done: "Finished") -> None:
        self.prompt_tokens.inc(done.prompt_tokens)
        self.reused_tokens.inc(done.reused_tokens)
        self.completion_tokens.inc(done.completion_tokens)
        self.seconds.inc(done.seconds)
        if done.completion_tokens:
            self.tokens_per_second.set(done.decode_tokens_per_second)

    def render(self) -> bytes:
        return generate_latest(self.registry)
