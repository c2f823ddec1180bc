"""lm-eval's own command line with our model registered: ``python -m dsmoe.evals.lm_eval_cli``.

lm-eval 0.4.13 finds models only in its built-in table or among classes already imported (it
reads no entry points for models), so ``lm_eval --model dsmoe`` alone cannot see us. This runs
the same CLI after the import, with our task folder (CLUEWSC, CHID, Pile) on the task path:

    python -m dsmoe.evals.lm_eval_cli run --model dsmoe --model_args pretrained=PATH,dtype=fp32 --tasks cluewsc

Our HumanEval and MBPP (scored offline by ``dsmoe.evals.code_exec``) replace lm-eval's; with
``--confirm_run_unsafe_code`` their generated programs are run.

lm-eval's two caches are refused: ``--use_cache`` keeps answers as pickles (SqliteDict) and
``--cache_requests`` as dill pickles, and a crafted file in either would run code when read.
``dsmoe eval`` has a cache of its own that stores plain data.
"""

from __future__ import annotations

import os
import sys

import dsmoe.evals  # noqa: F401  (registers the "dsmoe" model)
from dsmoe.evals.runner import TASKS_DIR


PICKLING_FLAGS = ("--use_cache", "-c", "--cache_requests")


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    refused = [a for a in args if a.split("=", 1)[0] in PICKLING_FLAGS]
    if refused:
        print(f"error: {refused[0].split('=', 1)[0]} is refused: lm-eval keeps that cache as pickles, which run "
              "code when read; use `dsmoe eval` (it resumes from a cache of plain data)", file=sys.stderr)
        sys.exit(2)
    if "--include_path" not in args and (not args or args[0] in ("run", "ls", "validate") or args[0].startswith("-")):
        args += ["--include_path", str(TASKS_DIR)]
    if "--confirm_run_unsafe_code" in args:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"  # the one consent lm-eval asks for covers our scorer too
    sys.argv = ["lm-eval", *args]
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
