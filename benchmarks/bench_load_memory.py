"""RSS growth of a quantizing load with and without returning freed heap pages (malloc_trim).

    python benchmarks/bench_load_memory.py                 # 3 runs each side, alternated
    python benchmarks/bench_load_memory.py --runs 5 --spec 16b:layers=2,n_routed_experts=16

Each run is a fresh process that loads a synthetic checkpoint at the 16B geometry's matrix sizes in
4-bit (every weight made in bf16, quantized and dropped: the pattern that fragmented glibc's heap)
and prints how much its RSS grew next to the bytes the model holds. "off" replaces
``release_freed_memory`` with a no-op. This was a test once; its bound sat inside the allocator's
noise (it passed in about half the runs with the release off), so it is measured here instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

PROBE = """
import json, sys, psutil, torch
import dsmoe.model.loader as loader, dsmoe.checkpoint.memory as memory
from dsmoe.perf.synthetic import SyntheticCheckpoint
if sys.argv[2] == "off":
    loader.release_freed_memory = memory.release_freed_memory = lambda: None
torch.set_num_threads(1)
before = psutil.Process().memory_info().rss
model = loader.load_model(SyntheticCheckpoint(sys.argv[1], seed=0), bits=4)
held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
print(json.dumps({"grew": psutil.Process().memory_info().rss - before, "held": held}))
"""


def run(spec: str, release: str) -> dict[str, int]:
    done = subprocess.run([sys.executable, "-c", PROBE, spec, release], capture_output=True, text=True,
                          timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", default="16b:layers=2,n_routed_experts=16")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    ratios: dict[str, list[float]] = {"on": [], "off": []}
    for i in range(args.runs):
        for release in ("on", "off") if i % 2 == 0 else ("off", "on"):
            numbers = run(args.spec, release)
            ratios[release].append(numbers["grew"] / numbers["held"])
            print(f"run {i + 1} release {release}: grew {numbers['grew'] / 2**20:.0f} MiB, "
                  f"held {numbers['held'] / 2**20:.0f} MiB, ratio {ratios[release][-1]:.2f}", flush=True)
    for release, values in ratios.items():
        print(f"release {release}: median grew/held {statistics.median(values):.2f} "
              f"(min {min(values):.2f}, max {max(values):.2f}, {len(values)} runs)")


if __name__ == "__main__":
    main()
