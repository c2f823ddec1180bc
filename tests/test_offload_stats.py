"""An expert store's counters, filled by hand: every expected number is worked out in the comments."""

from __future__ import annotations

import threading
from dataclasses import asdict

import pytest
from dsmoe.offload.stats import LayerStats, StoreStats


def _filled() -> StoreStats:
    stats = StoreStats()
    # Layer 1: 3 hits, 1 miss, prefetcher named 4 of which 3 were used. Layer 2: 1 hit, 3 misses
    # (2 run on the host), named 2, used 0.
    stats.layers[1] = LayerStats(hits=3, misses=1, predicted=4, predicted_used=3, prefetched=2)
    stats.layers[2] = LayerStats(hits=1, misses=3, host_runs=2, predicted=2, predicted_used=0)
    stats.moved("disk->ram", 1000)
    stats.moved("ram->cuda:0", 300)
    stats.moved("disk->ram", 500)
    stats.tokens = 10
    return stats


def test_counts_and_rates_per_layer_and_overall():
    stats = _filled()
    assert stats.layers[1].accesses == 4 and stats.layers[2].accesses == 4
    assert (stats.hits(), stats.misses()) == (4, 4)
    assert (stats.hits(1), stats.misses(1), stats.hits(2), stats.misses(2)) == (3, 1, 1, 3)
    assert stats.hit_rate() == 0.5  # 4 of 8
    assert stats.hit_rate(1) == 0.75 and stats.hit_rate(2) == 0.25
    assert stats.prefetch_accuracy() == 0.5  # 3 of 6 named
    assert stats.prefetch_accuracy(1) == 0.75 and stats.prefetch_accuracy(2) == 0.0


def test_bytes_per_token_per_link_and_in_all():
    stats = _filled()
    assert stats.link_bytes == {"disk->ram": 1500, "ram->cuda:0": 300}
    assert stats.bytes_per_token("disk->ram") == 150.0
    assert stats.bytes_per_token("ram->cuda:0") == 30.0
    assert stats.bytes_per_token() == 180.0
    assert stats.bytes_per_token("ram->cpu") == 0.0  # a link that moved nothing


def test_nothing_counted_yet_is_zero_not_an_error():
    stats = StoreStats()
    assert stats.hit_rate() == 0.0 and stats.prefetch_accuracy() == 0.0 and stats.bytes_per_token() == 0.0
    stats.moved("disk->ram", 64)  # bytes but no tokens (a prefetch before the first pass)
    assert stats.bytes_per_token() == 0.0 and stats.bytes_per_token("disk->ram") == 0.0
    stats.layer(3)
    assert stats.hit_rate(3) == 0.0 and stats.prefetch_accuracy(3) == 0.0
    with pytest.raises(KeyError):
        stats.hit_rate(4)  # a layer the store never saw


def test_layer_creates_once_and_keeps_counting():
    stats = StoreStats()
    stats.layer(5).hits += 2
    stats.layer(5).hits += 1
    assert stats.layers == {5: LayerStats(hits=3)}


def test_reset_clears_everything():
    stats = _filled()
    stats.reset()
    assert stats.layers == {} and stats.link_bytes == {} and stats.tokens == 0
    assert stats.hit_rate() == 0.0


def test_as_dict_is_plain_data():
    assert _filled().as_dict() == {
        "tokens": 10,
        "hit_rate": 0.5,
        "prefetch_accuracy": 0.5,
        "bytes_per_token": {"disk->ram": 150.0, "ram->cuda:0": 30.0},
        "link_bytes_per_s": {},  # _filled counts bytes with ``moved``, untimed
        "layers": {
            1: {"hits": 3, "misses": 1, "host_runs": 0, "predicted": 4, "predicted_used": 3, "prefetched": 2},
            2: {"hits": 1, "misses": 3, "host_runs": 2, "predicted": 2, "predicted_used": 0, "prefetched": 0},
        },
    }


def test_as_dict_lists_layers_in_order():
    stats = StoreStats()
    for idx in (7, 2, 4):
        stats.layer(idx)
    assert list(stats.as_dict()["layers"]) == [2, 4, 7]


def test_moved_from_many_threads_loses_nothing():
    stats = StoreStats()

    def add() -> None:
        for _ in range(2000):
            stats.moved("disk->ram", 3)

    threads = [threading.Thread(target=add) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stats.link_bytes["disk->ram"] == 4 * 2000 * 3


def test_bytes_per_token_keeps_fractions():
    stats = StoreStats(tokens=8)
    stats.moved("disk->ram", 1500)
    assert stats.bytes_per_token() == 187.5 and stats.bytes_per_token("disk->ram") == 187.5


def test_a_new_layer_counts_nothing():
    assert asdict(LayerStats()) == {"hits": 0, "misses": 0, "host_runs": 0, "predicted": 0, "predicted_used": 0,
                                    "prefetched": 0}


def test_stats_compare_by_their_counts_not_their_lock():
    first, second = _filled(), _filled()
    assert first == second and StoreStats() == StoreStats()
    second.layer(1).hits += 1
    assert first != second


def test_only_hits_or_only_misses():
    stats = StoreStats(layers={1: LayerStats(hits=2), 2: LayerStats(misses=5)})
    assert stats.hit_rate(1) == 1.0 and stats.hit_rate(2) == 0.0 and stats.hit_rate() == 2 / 7


def test_repr_shows_the_counts_not_the_lock():
    assert "lock" not in repr(StoreStats()) and "tokens=0" in repr(StoreStats())


def test_overlapping_transfers_count_their_busy_time_once(monkeypatch):
    # Two reads in flight together from t=1 (the first starts) to t=6 (the last ends), one alone
    # over [10, 11]: busy 5 + 1 = 6 s for 300 bytes, 50 bytes/s. The clock is read only when the
    # link goes busy or idle; the bytes count when each read ends.
    from dsmoe.offload import stats as stats_module
    from dsmoe.offload.stats import StoreStats

    clock = iter([1.0, 6.0, 10.0, 11.0])
    monkeypatch.setattr(stats_module.time, "perf_counter", lambda: next(clock))
    stats = StoreStats()
    first, second, third = (stats.transfer("disk->ram", n) for n in (100, 150, 50))
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert stats.link_bytes == {"disk->ram": 100} and stats.link_busy_seconds == {}
    second.__exit__(None, None, None)
    assert stats.link_busy_seconds == {"disk->ram": 5.0}
    with third:
        pass
    assert stats.link_busy_seconds == {"disk->ram": 6.0}
    assert stats.link_bandwidth("disk->ram") == 50.0 and stats.link_bandwidth("ram->cuda:0") is None
