"""Time to the first token of a stored checkpoint, warm and cold: dsmoe against llama.cpp on the same weights.

    python benchmarks/bench_load_time.py --dsmoe /work/bench/16b8-q4 \
        --gguf /work/bench/compare/16b-L8-Q4_0.gguf --llama-cpp /work/bench/llamacpp --runs 3

Each run is a fresh process that loads the model, reads a 5-word prompt and writes one token:
`dsmoe generate -m DIR -n 1` and `llama-completion -m GGUF -n 1 -no-cnv --no-warmup`, alternated.
Cold runs drop the page cache first (root: /proc/sys/vm/drop_caches); each cold round also reads
both files once with the cache dropped, a `dd`-style probe of the disk's bandwidth, so the cold
figure can be set against bytes / bandwidth. Prints a markdown table, medians of the runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "The capital of France is"


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def files_of(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def read_rate(path: Path) -> tuple[int, float]:
    """Bytes and seconds to read every file under ``path`` once, 16 MiB at a time, from a dropped cache."""
    drop_page_cache()
    total, started = 0, time.perf_counter()
    for file in files_of(path):
        with open(file, "rb", buffering=0) as f:
            while chunk := f.read(16 << 20):
                total += len(chunk)
    return total, time.perf_counter() - started


def timed(cmd: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsmoe", type=Path, required=True, help="a stored dsmoe/bitsandbytes checkpoint folder")
    parser.add_argument("--gguf", type=Path, required=True, help="llama.cpp's file of the same weights")
    parser.add_argument("--llama-cpp", type=Path, required=True, help="folder made by build_llama_cpp.sh")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    tools = {
        "dsmoe": (["dsmoe", "generate", "-m", str(args.dsmoe), "-n", "1", PROMPT], args.dsmoe),
        "llama.cpp": ([str(args.llama_cpp / "build" / "bin" / "llama-completion"), "-m", str(args.gguf), "-p", PROMPT,
                       "-n", "1", "-no-cnv", "--no-warmup"], args.gguf),
    }
    times: dict[tuple[str, str], list[float]] = {(tool, state): [] for tool in tools for state in ("warm", "cold")}
    rates: dict[str, list[tuple[int, float]]] = {tool: [] for tool in tools}
    for run in range(args.runs):
        order = list(tools) if run % 2 == 0 else list(reversed(tools))
        for tool in order:
            cmd, path = tools[tool]
            rates[tool].append(read_rate(path))
            drop_page_cache()
            times[tool, "cold"].append(timed(cmd))
            times[tool, "warm"].append(timed(cmd))  # the cold run just filled the cache
            print(f"run {run + 1} {tool}: cold {times[tool, 'cold'][-1]:.1f} s, warm {times[tool, 'warm'][-1]:.1f} s",
                  file=sys.stderr, flush=True)
    print(f"\nTime to first token from a fresh process, median of {args.runs} alternated runs\n")
    print("| tool | file GB | warm s | cold s | disk read GB/s (probe) | bytes / bandwidth s | cold / (bytes / bandwidth) |")
    print("|---|---|---|---|---|---|---|")
    for tool in tools:
        size = rates[tool][0][0]
        bandwidth = statistics.median(b / s for b, s in rates[tool])
        cold, warm = statistics.median(times[tool, "cold"]), statistics.median(times[tool, "warm"])
        print(f"| {tool} | {size / 1e9:.2f} | {warm:.1f} | {cold:.1f} | {bandwidth / 1e9:.2f} | {size / bandwidth:.1f} "
              f"| {cold / (size / bandwidth):.2f} |")
    ratio = statistics.median(a / b for a, b in zip(times["dsmoe", "warm"], times["llama.cpp", "warm"]))
    print(f"\nwarm dsmoe / llama.cpp, median of paired runs: {ratio:.2f}")


if __name__ == "__main__":
    main()
