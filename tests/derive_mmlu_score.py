"""Derive the MMLU ``--limit 3`` score that test_cli_mmlu_offline_end_to_end pins, without the adapter.

lm-eval builds and scores the requests (its own few-shot sampling, splitting and aggregation); the
model side is ``LmEvalPeer``: one plain forward pass per request, no shared cache, no batching.
Run from the repository root: ``python tests/derive_mmlu_score.py`` (about two minutes).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import lm_eval

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from dsmoe import load
from dsmoe.evals.runner import EvalSettings, build, plan, task_manager
from lm_eval_peer import LmEvalPeer

SHARED = HERE.parents[0].parent / "shared"


def main() -> None:
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    tiny = SHARED / "fixtures" / "tiny-deepseek"
    settings = EvalSettings(model=str(tiny), tasks=["mmlu"], data_dir=str(SHARED / "evaldata"), limit=3)
    manager = task_manager(["mmlu"])
    (row,) = plan(settings, manager)
    build([row], settings, manager)
    model, tokenizer = load(tiny, dtype="fp32")
    results = lm_eval.simple_evaluate(model=LmEvalPeer(model, tokenizer), tasks=[row.built], limit=3,
                                      bootstrap_iters=0, task_manager=manager)
    print(f"mmlu acc at --limit 3: {100 * results['results']['mmlu']['acc,none']!r}")


if __name__ == "__main__":
    main()
