"""Benchmark data from a local folder laid out like ``shared/evaldata`` instead of the hub.

Each lm-eval task names its data by hub dataset (``dataset_path``/``dataset_name``); the readers
here turn the local files of that dataset into the same splits and fields, so lm-eval's own
prompts and metrics run unchanged. Row counts are compared with the full sets, so a run on a
partial copy says so.
"""

from __future__ import annotations

import csv
import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import datasets

from dsmoe.errors import EvalError

Rows = list[dict[str, Any]]
Reader = Callable[[Path, str | None], dict[str, Rows]]


class MissingLocalData(EvalError):
    """The data folder has no copy of a task's dataset."""


@dataclass(frozen=True)
class LocalSource:
    """How to read one hub dataset from the data folder, and how big its full evaluation set is."""

    folder: str
    read: Reader
    full_rows: Callable[[str | None], int | None]
    note: str | None = None


def _jsonl(path: Path) -> Rows:
    if not path.is_file():
        raise EvalError(f"missing data file {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _csv(path: Path) -> Rows:
    if not path.is_file():
        raise EvalError(f"missing data file {path}")
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _read_mmlu(folder: Path, name: str | None) -> dict[str, Rows]:
    subjects = [name] if name and name != "all" else sorted(p.name[: -len("_test.csv")] for p in (folder / "test").glob("*_test.csv"))
    splits: dict[str, Rows] = {"test": [], "dev": []}
    for subject in subjects:
        for split in splits:
            for row in _csv(folder / split / f"{subject}_{split}.csv"):
                splits[split].append({
                    "question": row["question"], "subject": subject,
                    "choices": [row[f"choice{i}"] for i in range(4)], "answer": int(row["answer"]),
                })
    return splits


def _read_arc(folder: Path, name: str | None) -> dict[str, Rows]:
    return {split: _jsonl(folder / f"{name}-{split}.jsonl") for split in ("test", "validation")}


def _read_piqa(folder: Path, name: str | None) -> dict[str, Rows]:
    rows = _jsonl(folder / "valid.jsonl")
    labels_path = folder / "valid-labels.lst"
    if not labels_path.is_file():
        raise EvalError(f"missing data file {labels_path}")
    labels = [int(line) for line in labels_path.read_text().split()]
    if len(labels) != len(rows):
        raise EvalError(f"{labels_path}: {len(labels)} labels for {len(rows)} questions")
    return {"validation": [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": label}
                           for r, label in zip(rows, labels)]}


def _read_drop(folder: Path, name: str | None) -> dict[str, Rows]:
    """DROP's local answers are lists of spans; lm-eval's DROP reads the hub's answer records."""
    blank_date = {"day": "", "month": "", "year": ""}
    rows = []
    for r in _jsonl(folder / "drop_validation_subset1000_seed1234.jsonl"):
        answers = r["answers"] or [[]]
        rows.append({
            "query_id": r["query_id"], "passage": r["passage"], "question": r["question"],
            "answer": {"number": "", "date": blank_date, "spans": list(answers[0])},
            "validated_answers": {"number": [""] * (len(answers) - 1), "date": [blank_date] * (len(answers) - 1),
                                  "spans": [list(a) for a in answers[1:]]},
        })
    return {"validation": rows}


def _read_math(folder: Path, name: str | None) -> dict[str, Rows]:
    rows = _jsonl(folder / "hendrycks_math_test.jsonl")
    if name and name != "default":
        rows = [r for r in rows if r["subject"] == name]
    return {"test": rows}


def _read_cmmlu(folder: Path, name: str | None) -> dict[str, Rows]:
    out: dict[str, Rows] = {}
    for split in ("test", "dev"):
        out[split] = [{k: row[k] for k in ("Question", "A", "B", "C", "D", "Answer")}
                      for row in _csv(folder / split / f"{name}.csv")]
    return out


def _read_ceval(folder: Path, name: str | None) -> dict[str, Rows]:
    out: dict[str, Rows] = {}
    for split in ("val", "dev"):
        out[split] = [{k: row[k] for k in ("id", "question", "A", "B", "C", "D", "answer")}
                      for row in _csv(folder / split / f"{name}_{split}.csv")]
    return out


def _read_fewclue(folder: Path, name: str | None) -> dict[str, Rows]:
    return {"train": _jsonl(folder / "train_few_all.json"), "validation": _jsonl(folder / "dev_few_all.json"),
            "test": _jsonl(folder / "test_public.json")}


def _single(split: str, filename: str) -> Reader:
    return lambda folder, name: {split: _jsonl(folder / filename)}


def _pair(first: tuple[str, str], second: tuple[str, str]) -> Reader:
    return lambda folder, name: {first[0]: _jsonl(folder / first[1]), second[0]: _jsonl(folder / second[1])}


_MMLU_TEST = 14042
_CMMLU = 11582
_CEVAL = 1346

# Full evaluation-set sizes (the evaldata README's row counts, or the public set's for subsets).
SOURCES: dict[str, LocalSource] = {
    "cais/mmlu": LocalSource("mmlu", _read_mmlu, lambda name: _MMLU_TEST if name in (None, "all") else None),
    "allenai/ai2_arc": LocalSource("arc", _read_arc, lambda name: {"ARC-Easy": 2376, "ARC-Challenge": 1172}.get(name or "")),
    "Rowan/hellaswag": LocalSource("hellaswag", _single("validation", "hellaswag_validation.jsonl"), lambda name: 10042),
    "baber/piqa": LocalSource("piqa", _read_piqa, lambda name: 1838),
    "allenai/winogrande": LocalSource("winogrande", _single("validation", "winogrande_xl_validation.jsonl"), lambda name: 1267),
    "openai/gsm8k": LocalSource("gsm8k", _pair(("test", "test.jsonl"), ("train", "train.jsonl")), lambda name: 1319),
    "openai/openai_humaneval": LocalSource("humaneval", _single("test", "HumanEval.jsonl.gz"), lambda name: 164),
    "google-research-datasets/mbpp": LocalSource("mbpp", _single("test", "mbpp_full_test.jsonl"), lambda name: 500),
    "EleutherAI/hendrycks_math": LocalSource("math", _read_math, lambda name: 5000 if name in (None, "default") else None),
    "google-research-datasets/nq_open": LocalSource("nq_open", _single("validation", "nq_open_validation.jsonl"), lambda name: 3610),
    "mandarjoshi/trivia_qa": LocalSource(
        "triviaqa", _single("validation", "trivia_qa_rc.wikipedia.nocontext_validation.jsonl"), lambda name: 17944,
        note="TriviaQA: the local copy is the 7,993-question wikipedia subset, not lm-eval's 17,944-question rc.nocontext set",
    ),
    "EleutherAI/drop": LocalSource(
        "drop", _read_drop, lambda name: 9536,
        note="DROP: the local copy is a 1,000-question subset of the 9,536-question validation set",
    ),
    "haonan-li/cmmlu": LocalSource("cmmlu", _read_cmmlu, lambda name: None),
    "ceval/ceval-exam": LocalSource("ceval", _read_ceval, lambda name: None),
    "fewclue/cluewsc": LocalSource("cluewsc", _read_fewclue, lambda name: 976),
    "fewclue/chid": LocalSource("chid", _read_fewclue, lambda name: 2002),
    "EleutherAI/pile": LocalSource("pile", _single("test", "test.jsonl"), lambda name: None),
}

# Groups whose subject files add up to one full set: checked as a whole.
GROUP_FULL_ROWS = {"cais/mmlu": _MMLU_TEST, "haonan-li/cmmlu": _CMMLU, "ceval/ceval-exam": _CEVAL}


def local_key(cfg: dict[str, Any]) -> str | None:
    """The local source that serves a task config: our own tasks name it in their metadata."""
    metadata = cfg.get("metadata") or {}
    return metadata.get("local_data") or cfg.get("dataset_path")


def has_local(cfg: dict[str, Any]) -> bool:
    return local_key(cfg) in SOURCES


def load_local(data_dir: str | Path, key: str, name: str | None, **_task_metadata: Any) -> datasets.DatasetDict:
    """The splits of one dataset read from ``data_dir``; lm-eval calls this as a task's ``custom_dataset``."""
    source = SOURCES[key]
    folder = Path(data_dir) / source.folder
    if not folder.is_dir():
        raise MissingLocalData(f"{folder}: no local copy of {key}; run without --data-dir to download it")
    splits = source.read(folder, name)
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows) for split, rows in splits.items() if rows})


def describe_sources() -> dict[str, str]:
    """Hub dataset -> local folder, for error messages and docs."""
    return {key: source.folder for key, source in SOURCES.items()}
