"""The loader's fuzz suite (tests/test_fuzz_loader.py) with many more examples than CI runs.

    python benchmarks/fuzz_loader.py [--examples 2000]

Each example is a random or hostile safetensors header, raw file, index file or config.json;
the property checked is the suite's: it loads, or raises DsmoeError, and anything accepted reads
only bytes inside its file. Prints the examples tried and the time taken.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FUZZ_TESTS = ["test_safetensors_headers", "test_safetensors_raw_bytes", "test_index_files", "test_config_values"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=2000, help="Examples per property (CI runs 100).")
    args = parser.parse_args()
    env = {**os.environ, "DSMOE_FUZZ_EXAMPLES": str(args.examples)}
    selection = " or ".join(FUZZ_TESTS)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--hypothesis-seed=0",
                           str(REPO / "tests" / "test_fuzz_loader.py"), "-k", selection], cwd=REPO, env=env, check=False)
    seconds = time.perf_counter() - started
    outcome = "no property violated" if proc.returncode == 0 else "FAILED"
    print(f"{len(FUZZ_TESTS)} properties x {args.examples} examples: {outcome} in {seconds:.0f} s")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
