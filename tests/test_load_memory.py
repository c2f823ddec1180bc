"""Loading gives freed heap pages back as it goes (the RSS effect is measured by
benchmarks/bench_load_memory.py: a bound on RSS here sat inside the allocator's noise)."""

from __future__ import annotations

import torch
from dsmoe.perf.synthetic import SyntheticCheckpoint
from dsmoe.model.loader import load_model
from dsmoe.checkpoint.memory import ReleaseEvery

MIB = 2**20


def test_release_cadence(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr("dsmoe.checkpoint.memory.release_freed_memory", lambda: calls.append(1))
    release = ReleaseEvery(nbytes=100)
    for size in (40, 40, 40, 10, 90, 5):
        release.processed(size)
    assert len(calls) == 2  # after 120 bytes and after 100 more


def test_default_cadence_is_256_mib(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr("dsmoe.checkpoint.memory.release_freed_memory", lambda: calls.append(1))
    release = ReleaseEvery()
    release.processed(256 * MIB - 1)
    assert calls == []
    release.processed(1)
    assert len(calls) == 1


SMALL = ("16b:layers=3,vocab_size=300,hidden_size=64,intermediate_size=96,moe_intermediate_size=16,"
         "n_routed_experts=8,num_experts_per_tok=2,num_attention_heads=4,num_key_value_heads=4")


def test_a_quantizing_load_releases_freed_memory_as_it_goes(monkeypatch) -> None:
    # The loader's releaser, at 64 KiB instead of 256 MiB so a small checkpoint shows the cadence.
    every = 64 * 1024
    calls: list[str] = []
    monkeypatch.setattr("dsmoe.checkpoint.memory.release_freed_memory", lambda: calls.append("every"))
    monkeypatch.setattr("dsmoe.model.loader.release_freed_memory", lambda: calls.append("end"))
    monkeypatch.setattr("dsmoe.model.loader.ReleaseEvery", lambda: ReleaseEvery(nbytes=every))
    checkpoint = SyntheticCheckpoint(SMALL, seed=0)
    sizes = [checkpoint.nbytes(name) for name in checkpoint.tensor_names()]
    load_model(checkpoint, bits=4, dtype=torch.bfloat16)
    # Each release follows at least `every` bytes read and at most `every` plus one tensor more.
    periodic = calls.count("every")
    assert sum(sizes) // (every + max(sizes)) <= periodic <= sum(sizes) // every
    assert periodic >= 3 and calls[-1] == "end"
