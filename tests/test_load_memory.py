"""Loading keeps the process's memory near what the model holds, not what loading churned through."""

from __future__ import annotations

import json
import subprocess
import sys

from dsmoe.model.memory import ReleaseEvery

# Quantize-on-load at the 16B geometry's matrix sizes (2 layers, 16 experts): every weight is
# made in bf16, quantized and dropped, the pattern that fragmented glibc's heap.
PROBE = """
import json, psutil, torch
from dsmoe.bench.synthetic import SyntheticCheckpoint
from dsmoe.model.loader import load_model
torch.set_num_threads(1)
before = psutil.Process().memory_info().rss
model = load_model(SyntheticCheckpoint("16b:layers=2,n_routed_experts=16", seed=0), bits=4)
held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
print(json.dumps({"grew": psutil.Process().memory_info().rss - before, "held": held}))
"""


def test_rss_after_a_quantizing_load_is_near_the_model_size() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    numbers = json.loads(done.stdout.strip().splitlines()[-1])
    # Without returning freed heap pages this grew to ~3x the held bytes.
    assert numbers["grew"] < 1.5 * numbers["held"] + 200 * 2**20, numbers


def test_release_cadence(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr("dsmoe.model.memory.release_freed_memory", lambda: calls.append(1))
    release = ReleaseEvery(nbytes=100)
    for size in (40, 40, 40, 10, 90, 5):
        release.processed(size)
    assert len(calls) == 2  # after 120 bytes and after 100 more
