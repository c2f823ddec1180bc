"""Loading gives freed heap pages back as it goes (the RSS effect is measured by
benchmarks/bench_load_memory.py: a bound on RSS here sat inside the allocator's noise)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
from dsmoe.checkpoint.reader import Checkpoint, read_ahead
from dsmoe.errors import CheckpointError
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


class _CountingCheckpoint:
    """Twenty 10-byte tensors whose reads and uses are logged in order, the fifth one unreadable."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []

    def nbytes(self, name: str) -> int:
        return 10

    def get(self, name: str) -> torch.Tensor:
        index = int(name)
        if index == 5:
            raise CheckpointError(f"tensor {name!r} is truncated")
        self.log.append(("read", index))
        return torch.full((1,), index)


def test_read_ahead_gives_each_group_in_order_as_get_reads_it(tiny_path) -> None:  # type: ignore[no-untyped-def]
    checkpoint = Checkpoint(tiny_path)
    names = checkpoint.tensor_names()
    groups = [names[i:i + 3] for i in range(0, len(names), 3)]
    for group, tensors in zip(groups, read_ahead(checkpoint, groups, window=1000), strict=True):
        assert list(tensors) == group
        for name in group:
            assert torch.equal(tensors[name], checkpoint.get(name))


def test_read_ahead_stays_within_its_window_and_reports_a_failed_read() -> None:
    checkpoint = _CountingCheckpoint()
    groups = [[str(i)] for i in range(5)]
    for index, tensors in enumerate(read_ahead(checkpoint, groups, window=25)):  # type: ignore[arg-type]
        time.sleep(0.02)  # time for the reader to run as far ahead as it may
        assert int(tensors[str(index)]) == index
        checkpoint.log.append(("used", index))
    # A window of 25 bytes: the reader starts another tensor while fewer than 25 bytes wait unused,
    # so at most three (30 bytes) are read and not yet used, the one in use counted: no more, and
    # it did read that far ahead.
    reads = used = most = 0
    for event, _ in checkpoint.log:
        reads, used = reads + (event == "read"), used + (event == "used")
        most = max(most, reads - used)
    assert most == 3
    with pytest.raises(CheckpointError, match="'5' is truncated"):
        list(read_ahead(checkpoint, [[str(i)] for i in range(8)], window=25))  # type: ignore[arg-type]


def test_a_load_gives_the_threads_back() -> None:
    torch.set_num_threads(2)
    load_model(SyntheticCheckpoint(SMALL, seed=0), bits=4, dtype=torch.bfloat16)
    assert torch.get_num_threads() == 2


_RUN_AFTER_LOAD = f"""
import gc, resource, torch
from dsmoe.loading import load
from dsmoe.perf.synthetic import SyntheticCheckpoint

def faults_of_a_pass():
    # four 24 MB activations, written and freed together, twice: the faults of the second time
    for _ in range(2):
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [torch.ones(6 * 2**20) for _ in range(4)]
        del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

before, frozen_before = faults_of_a_pass(), gc.get_freeze_count()
load(SyntheticCheckpoint({SMALL!r}, seed=0), bits=4)
faults_of_a_pass()  # now and then a block of the first pass after the load still faults in
print(before, faults_of_a_pass(), frozen_before, gc.get_freeze_count())
"""


def test_a_loaded_model_runs_on_reused_memory_and_an_untouched_collector() -> None:
    """After a load, a pass's freed activations stay in the heap for the next pass, where glibc's
    defaults gave them back and the next pass faulted 96 MB of fresh pages in (24k faults; the
    first count shows that happening before the load), and the load's objects are out of the
    collector's scans. In a fresh process: both are settings of the whole process."""
    result = subprocess.run([sys.executable, "-c", _RUN_AFTER_LOAD], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    faults_before, faults_after, frozen_before, frozen_after = map(int, result.stdout.split())
    # Relative bounds: with transparent huge pages always on, one fault maps 2 MB, not 4 KB.
    assert faults_before >= 40  # 96 MB came back fresh (24k faults of 4 KB pages here)
    assert faults_after * 10 < faults_before
    assert frozen_before == 0 and frozen_after > 10_000
