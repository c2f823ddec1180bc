"""MMLU 5-shot loglikelihood throughput: before and after issue 19's scoring, in one run, alternated.

    python benchmarks/bench_eval.py                       # the 16B geometry, 8 layers, 4-bit (random weights)
    python benchmarks/bench_eval.py --model PATH --dtype fp32 --context 0
    python benchmarks/bench_eval.py --model /work/bench/16b8-q4          # a `dsmoe quantize` output, as stored
    python benchmarks/bench_eval.py --mmlu-only --questions 4 --rounds 3

Two measurements:

* prefill tok/s of one MMLU-length row, with logits for every position (what a scored row cost
  before: 102400-wide rows for the whole context) and with ``positions=`` (only the last one);
* MMLU 5-shot requests/s. "before" is the per-question path the adapter used until now: prefill
  the shared context at batch 1 into a KV cache, then score the four choices against a copy of it.
  "after" is DsmoeLM.loglikelihood as it is: one-token choices read their context's last position,
  and the questions are batched (sorted by length) at batch 1, 4 and 8.

The synthetic geometry comes with a byte-level tokenizer, so contexts are left-truncated to
``--context`` tokens (default 600, a 5-shot MMLU prompt's length with DeepSeek's tokenizer).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from dsmoe.perf.synthetic import SyntheticCheckpoint, write_byte_tokenizer  # noqa: E402
from dsmoe.evals import DsmoeLM  # noqa: E402
from dsmoe.evals.runner import EvalSettings, _leaves, build, plan, task_manager  # noqa: E402
from dsmoe import load  # noqa: E402
from dsmoe.model.loader import load_model  # noqa: E402
from dsmoe.model.tokenizer import load_tokenizer  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MMLU_TASK = "mmlu_high_school_biology"


def load_target(args: argparse.Namespace):
    """(model, tokenizer, name): a checkpoint folder, or the synthetic geometry with its byte tokenizer."""
    if args.model:
        stored = json.loads((Path(args.model) / "config.json").read_text()).get("quantization_config")
        if stored:  # a `dsmoe quantize` output: its stored format, not quantized again
            args.bits = 4 if stored.get("load_in_4bit") else 8
        model, tok = load(args.model, dtype=args.dtype, bits=None if stored else args.bits)
        return model, tok, args.model + (" (stored)" if stored else "")
    model = load_model(SyntheticCheckpoint(args.synthetic), dtype=args.dtype, bits=args.bits)
    with tempfile.TemporaryDirectory() as folder:
        write_byte_tokenizer(Path(folder))
        tok = load_tokenizer(Path(folder))
    return model, tok, f"synthetic {args.synthetic}"


def mmlu_requests(questions: int):
    settings = EvalSettings(model="", tasks=[MMLU_TASK], shots=5, limit=questions, data_dir=str(SHARED / "evaldata"))
    manager = task_manager(["mmlu"])
    rows = plan(settings, manager)
    build(rows, settings, manager)
    (leaf,) = _leaves(rows[0].built)
    leaf.build_all_requests(limit=questions, rank=0, world_size=1)
    return [i for i in leaf.instances if i.request_type == "loglikelihood"]


def before(lm: DsmoeLM, requests) -> None:
    """The per-question path: each context prefilled at batch 1 into a cache, its choices on copies."""
    groups: dict[tuple[int, ...], list[list[int]]] = defaultdict(list)
    for context, continuation in (r.args for r in requests):
        ctx, cont = lm._encode_pair(context, continuation)
        groups[tuple((ctx + cont)[-(lm.max_length + 1):][:-len(cont)])].append(cont)
    with torch.inference_mode():
        for seen, continuations in groups.items():
            lm._score_shared(list(seen), continuations)


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a checkpoint folder instead of the synthetic geometry")
    parser.add_argument("--synthetic", default="16b:layers=8")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--questions", type=int, default=8, help="MMLU questions per measurement (4 requests each)")
    parser.add_argument("--context", type=int, default=600, help="left-truncate contexts to this many tokens (0: none)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--mmlu-only", action="store_true", help="skip the lm_head measurement")
    args = parser.parse_args()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    torch.manual_seed(0)

    model, tok, name = load_target(args)
    requests = mmlu_requests(args.questions)
    batches = [int(b) for b in args.batches.split(",")]
    make = {b: DsmoeLM(model=model, tokenizer=tok, batch_size=b, max_length=args.context or None) for b in batches}
    print(f"{name}, {args.bits}-bit, {torch.get_num_threads()} threads; {len(requests)} requests "
          f"({args.questions} questions of {MMLU_TASK}, 5-shot), contexts of up to {make[batches[0]].max_length} tokens")

    if not args.mmlu_only:
        ids = torch.randint(0, tok.vocab_size, (1, make[batches[0]].max_length))
        last = torch.tensor([[ids.shape[1] - 1]])
        full_s, last_s = [], []
        with torch.inference_mode():
            model(ids[:, :16])  # warm-up
            for _ in range(args.rounds):
                full_s.append(timed(lambda: model(ids)))
                last_s.append(timed(lambda: model(ids, positions=last)))
        ratios = [f / s for f, s in zip(full_s, last_s)]
        n = ids.shape[1]
        print(f"prefill of {n} tokens, logits at every position: {n / statistics.median(full_s):.1f} tok/s; "
              f"at the last only: {n / statistics.median(last_s):.1f} tok/s; paired ratio median "
              f"{statistics.median(ratios):.3f} (runs {', '.join(f'{r:.3f}' for r in ratios)})")

    with torch.inference_mode():
        before(make[batches[0]], requests[:4])  # warm-up: first calls, native plans
    sides = ["before"] + [f"after b{b}" for b in batches]
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    for round_ in range(args.rounds):
        order = sides if round_ % 2 == 0 else sides[::-1]  # alternate, so drift hits both sides alike
        for side in order:
            if side == "before":
                seconds[side].append(timed(lambda: before(make[batches[0]], requests)))
            else:
                lm = make[int(side.removeprefix("after b"))]
                seconds[side].append(timed(lambda lm=lm: lm.loglikelihood(requests)))
    base = seconds["before"]
    for side in sides:
        runs = seconds[side]
        paired = statistics.median(b / s for b, s in zip(base, runs))
        print(f"{side:>9}: {len(requests) / statistics.median(runs):.2f} requests/s "
              f"(median of {len(runs)}: {statistics.median(runs):.1f} s), speed-up vs before {paired:.2f}x paired")


if __name__ == "__main__":
    main()
