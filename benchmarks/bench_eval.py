"""MMLU 5-shot loglikelihood requests per second, with and without the shared-context cache.

    python benchmarks/bench_eval.py [--model PATH] [--limit 3] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

from dsmoe import load  # noqa: E402
from dsmoe.evals import DsmoeLM  # noqa: E402
from dsmoe.evals.runner import EvalSettings, build, plan, run, task_manager  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(SHARED / "fixtures" / "tiny-deepseek"))
    parser.add_argument("--limit", type=int, default=3)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    settings = EvalSettings(model=args.model, tasks=["mmlu"], shots=5, limit=args.limit,
                            data_dir=str(SHARED / "evaldata"), cache_dir=None, batch_size=args.batch_size)
    manager = task_manager(["mmlu"])
    rows = plan(settings, manager)
    build(rows, settings, manager)
    model, tok = load(args.model, dtype=args.dtype)
    for share in (True, False):
        counted: dict[str, int] = {}
        lm = DsmoeLM(model=model, tokenizer=tok, batch_size=args.batch_size, share_context=share,
                     progress=lambda kind, done, total: counted.__setitem__(kind, total))
        started = time.perf_counter()
        run(lm, settings, rows, manager)
        seconds = time.perf_counter() - started
        n = counted.get("loglikelihood", 0)
        print(f"share_context={share}: {n} requests in {seconds:.1f} s = {n / seconds:.2f} requests/s, "
              f"MMLU acc {rows[0].score:.2f}")


if __name__ == "__main__":
    main()
