"""`dsmoe bench` under two or more builds of the native library, alternated, with paired ratios.

    cp native/_native.cpython-311-x86_64-linux-gnu.so /tmp/before.so    # before a change
    pip install -e .                                                     # after it
    python benchmarks/ab_native_builds.py --model DIR --prompt-tokens 256 -n 16 --rounds 4 \\
        /tmp/before.so native/_native.cpython-311-x86_64-linux-gnu.so

Each run is a fresh process, `dsmoe bench --json` with `dsmoe.native.library` pointed at one
build (which must pass the library's ABI check, like the installed one); the builds' order
reverses every round, so a machine whose speed drifts favours neither. Prints each round and
then, per build, the medians and the median of the per-round ratios to the first build: on a
machine whose memory bandwidth swings between runs, the ratios are the figures to read.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

LAUNCHER = """
import sys
import dsmoe.native.library as library
build = library.load_library(sys.argv.pop(1))
library._found = lambda: (build, "")
from dsmoe.cli.main import main
sys.argv[0] = "dsmoe"
main()
"""


def bench(build: Path, args: argparse.Namespace) -> tuple[float, float]:
    """(prefill, decode) tokens/s of one `dsmoe bench` run on ``build``."""
    command = [sys.executable, "-c", LAUNCHER, str(build), "bench", "--model", args.model, "--threads",
               str(args.threads), "--prompt-tokens", str(args.prompt_tokens), "-n", str(args.new_tokens), "--json"]
    result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    return result["prefill_tokens_per_s"], result["decode_tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("builds", type=Path, nargs="+", help="native library files; ratios are to the first")
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("-n", "--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    runs: dict[Path, list[tuple[float, float]]] = {build: [] for build in args.builds}
    for r in range(args.rounds):
        for build in args.builds if r % 2 == 0 else args.builds[::-1]:
            runs[build].append(bench(build, args))
        print(f"round {r + 1}: " + "  ".join(f"{b.name} {runs[b][-1][0]:.1f} / {runs[b][-1][1]:.2f}" for b in args.builds),
              flush=True)
    first = runs[args.builds[0]]
    print(f"{args.prompt_tokens}-token prefill and {args.new_tokens}-token decode, tok/s; paired: median of per-round ratios")
    for build, values in runs.items():
        prefill = statistics.median(p for p, _ in values)
        decode = statistics.median(d for _, d in values)
        prefill_ratio = statistics.median(p / q for (p, _), (q, _) in zip(values, first))
        decode_ratio = statistics.median(d / e for (_, d), (_, e) in zip(values, first))
        print(f"  {build.name}: prefill {prefill:.1f} (paired {prefill_ratio:.3f}), decode {decode:.2f} (paired {decode_ratio:.3f})")


if __name__ == "__main__":
    main()
