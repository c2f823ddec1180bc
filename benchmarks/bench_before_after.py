"""Two installs of dsmoe on the same checkpoints, alternated in one run: did a change cost speed?

    python benchmarks/bench_before_after.py --before OLD/.venv/bin/dsmoe --after .venv/bin/dsmoe \\
        --model /work/bench/16b8-q4 --model /work/bench/16b8-q8 --rounds 5

Each round runs ``dsmoe bench --model M --json`` (2 threads, 64-token prefill, 32-token decode)
with the "before" install, then the "after" one (the order swaps every round, so neither side
always runs on a warmer machine), and the table gives medians and the median of the per-round
after / before ratios. This machine's memory bandwidth swings between runs: read the paired ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

METRICS = ("prefill_tokens_per_s", "decode_tokens_per_s")


def bench(dsmoe: str, model: str, threads: int) -> dict[str, float]:
    out = subprocess.run([dsmoe, "bench", "--model", model, "--json", "--threads", str(threads)],
                         check=True, text=True, capture_output=True).stdout
    result = json.loads(out)
    return {metric: float(result[metric]) for metric in METRICS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the dsmoe executable of the old install")
    parser.add_argument("--after", required=True, help="the dsmoe executable of the new install")
    parser.add_argument("--model", action="append", required=True, help="checkpoint folder (repeatable)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", help="write every run as JSON here")
    args = parser.parse_args()
    runs: dict[str, dict[str, list[dict[str, float]]]] = {m: {"before": [], "after": []} for m in args.model}
    for round_ in range(args.rounds):
        for model in args.model:
            order = ("before", "after") if round_ % 2 == 0 else ("after", "before")
            for side in order:
                runs[model][side].append(bench(getattr(args, side), model, args.threads))
                print(f"round {round_ + 1} {side:6s} {model}: {runs[model][side][-1]}", file=sys.stderr, flush=True)
    print("| checkpoint | metric | before (median) | after (median) | after / before (median of pairs) |")
    print("|---|---|---|---|---|")
    for model, sides in runs.items():
        for metric in METRICS:
            before = [r[metric] for r in sides["before"]]
            after = [r[metric] for r in sides["after"]]
            ratio = statistics.median(a / b for a, b in zip(after, before))
            print(f"| {model} | {metric} | {statistics.median(before):.1f} | {statistics.median(after):.1f} | {ratio:.3f} |")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(runs, handle, indent=1)


if __name__ == "__main__":
    main()
