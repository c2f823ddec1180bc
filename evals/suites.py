"""The DeepSeekMoE report's benchmarks as lm-eval tasks, and the report's scores to compare with."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from dsmoe.errors import EvalError

REPORT_SCORES = Path(__file__).with_name("report_scores.json")


@dataclass(frozen=True)
class Benchmark:
    """One report benchmark: the lm-eval task that measures it and the result key read as its score.

    ``base`` and ``overrides`` define a task lm-eval lacks as a variant of one it has. ``folders``
    are the folders of lm-eval's task tree that define it: indexing only those is seconds faster.
    """

    name: str
    task: str
    metric_key: str
    base: str | None = None
    overrides: tuple[tuple[str, object], ...] = ()
    runs_code: bool = False
    folders: tuple[str, ...] = ()
    note: str | None = None
    """Why this metric, or what differs from the report, shown under the results table."""

    @property
    def metric(self) -> str:
        """lm-eval's name of the metric the row shows: acc, acc_norm, exact_match, bits_per_byte, ..."""
        return self.metric_key.split(",")[0]

    @property
    def percent(self) -> bool:
        """lm-eval reports fractions; the report prints percent, except bits per byte."""
        return not self.metric_key.startswith("bits_per_byte")


PILE_NOTE = ("Pile: bits per byte of p(text | BOS), each document read as the model reads any text; lm-eval's "
             "HF model with this BOS-adding tokenizer also scores p(BOS | BOS), one token more per document: "
             "model_arg rolling_double_bos=true scores that way, for comparing with published lm-eval numbers")
BBH_NOTE = ("BBH: no local copy; the BIG-Bench Hard test sets are not in shared/evaldata nor in any package the "
            "registries serve here (PyPI's bigbench holds the source BIG-bench tasks, not BBH's 250-example sets)")


def _norm_note(name: str, arc: bool = False) -> str:
    """Why acc_norm: the report's choice accuracy is length-normalized (DeepSeek's evaluation framework,
    described in the DeepSeek LLM paper); plain acc favours short choices."""
    if arc:
        return (f"{name}: acc_norm; DeepSeek's evaluation framework normalizes ARC by each choice's "
                f"unconditional likelihood, which lm-eval's arc tasks do not offer: of acc and acc_norm, "
                f"the length-normalized acc_norm is the nearer")
    return (f"{name}: acc_norm (each choice's likelihood normalized by its length in bytes), not acc: the "
            f"report's choice accuracy is length-normalized, as DeepSeek's evaluation framework (DeepSeek LLM "
            f"paper) describes; unnormalized acc favours short choices")


BENCHMARKS: dict[str, Benchmark] = {b.name.lower(): b for b in [
    Benchmark("Pile", "pile", "bits_per_byte,none", note=PILE_NOTE),
    Benchmark("HellaSwag", "hellaswag", "acc_norm,none", folders=("hellaswag",), note=_norm_note("HellaSwag")),
    Benchmark("PIQA", "piqa", "acc_norm,none", folders=("piqa",), note=_norm_note("PIQA")),
    Benchmark("ARC-easy", "arc_easy", "acc_norm,none", folders=("arc",), note=_norm_note("ARC-easy", arc=True)),
    Benchmark("ARC-challenge", "arc_challenge", "acc_norm,none", folders=("arc",), note=_norm_note("ARC-challenge", arc=True)),
    Benchmark("RACE-middle", "race_middle", "acc,none", base="race", overrides=(("dataset_name", "middle"),), folders=("race",)),
    Benchmark("RACE-high", "race", "acc,none", folders=("race",)),
    Benchmark("DROP", "drop", "em,none", folders=("drop",)),
    Benchmark("GSM8K", "gsm8k", "exact_match,strict-match", folders=("gsm8k",)),
    Benchmark("MATH", "minerva_math", "exact_match,none", folders=("minerva_math", "benchmarks")),
    Benchmark("HumanEval", "humaneval", "pass@1,create_test", runs_code=True),  # ours: tasks/humaneval.yaml
    Benchmark("MBPP", "mbpp", "pass_at_1,none", runs_code=True),  # ours: tasks/mbpp.yaml
    Benchmark("TriviaQA", "triviaqa", "exact_match,remove_whitespace", folders=("triviaqa",)),
    Benchmark("NaturalQuestions", "nq_open", "exact_match,remove_whitespace", folders=("nq_open",)),
    Benchmark("MMLU", "mmlu", "acc,none", folders=("mmlu/default",)),
    Benchmark("WinoGrande", "winogrande", "acc,none", folders=("winogrande",)),
    Benchmark("CLUEWSC", "cluewsc", "exact_match,first-answer"),
    Benchmark("CEval", "ceval-valid", "acc,none", folders=("ceval",)),
    Benchmark("CMMLU", "cmmlu", "acc,none", folders=("cmmlu",)),
    Benchmark("CHID", "chid", "acc,none"),
    Benchmark("BBH", "bbh_fewshot", "exact_match,none", folders=("bbh/fewshot",), note=BBH_NOTE),
]}

BY_TASK = {b.task: b for b in BENCHMARKS.values()}


@dataclass(frozen=True)
class Suite:
    """A report table: which models' scores to show beside ours."""

    name: str
    table: int
    reference_model: str
    comparison_model: str


SUITES = {
    "report": Suite("report", 4, "DeepSeekMoE 16B", "LLaMA2 7B"),
    "report-chat": Suite("report-chat", 5, "DeepSeekMoE Chat 16B", "LLaMA2 SFT 7B"),
}


@dataclass(frozen=True)
class SuiteEntry:
    benchmark: Benchmark
    metric: str
    shots: int | None
    reference: float | None
    comparison: float | None


@lru_cache(maxsize=1)
def _report_rows() -> tuple[dict, ...]:
    return tuple(json.loads(REPORT_SCORES.read_text(encoding="utf-8"))["rows"])


def suite_entries(name: str) -> list[SuiteEntry]:
    """The suite's benchmarks in the report's order, with its shots and scores."""
    try:
        suite = SUITES[name]
    except KeyError:
        raise EvalError(f"unknown suite {name!r} (known: {', '.join(SUITES)})") from None
    rows = [r for r in _report_rows() if r["table"] == suite.table]
    entries = []
    for benchmark_name in dict.fromkeys(r["benchmark"] for r in rows):
        mine = [r for r in rows if r["benchmark"] == benchmark_name]
        score = {r["model"]: r["score"] for r in mine}
        entries.append(SuiteEntry(
            benchmark=BENCHMARKS[benchmark_name.lower()], metric=mine[0]["metric"], shots=mine[0]["shots"],
            reference=score.get(suite.reference_model), comparison=score.get(suite.comparison_model),
        ))
    return entries


def report_scores(benchmark: Benchmark, shots: int | None, suite: str = "report") -> tuple[str | None, float | None, float | None]:
    """(metric name, reference score, comparison score) of the report row with these shots, if any."""
    for entry in suite_entries(suite):
        if entry.benchmark == benchmark and (entry.shots == shots or entry.shots is None):
            return entry.metric, entry.reference, entry.comparison
    return None, None, None
