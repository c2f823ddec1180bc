"""Plan, run and record an evaluation: task names to lm-eval tasks, local data, resume, results file."""

from __future__ import annotations

import difflib
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import lm_eval
import lm_eval.tasks
import torch
from lm_eval.api.group import Group
from lm_eval.api.task import Task
from lm_eval.tasks import TaskManager
from lm_eval.tasks._factory import TaskFactory
from lm_eval.utils import handle_non_serializable

from dsmoe import __version__
from dsmoe.checkpoint.reader import checkpoint_fingerprint, resolve_model_path
from dsmoe.errors import EvalError, UsageError
from dsmoe.evals import local_data
from dsmoe.evals.cache import CachedLM, EvalCache, cache_key
from dsmoe.evals.local_data import MissingLocalData
from dsmoe.evals.suites import BENCHMARKS, BY_TASK, Benchmark, report_scores, suite_entries
from dsmoe.loading import LoadOptions

if TYPE_CHECKING:
    from lm_eval.tasks._index import Entry

    from dsmoe.evals.lm_model import DsmoeLM

TASKS_DIR = Path(__file__).with_name("tasks")
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dsmoe" / "eval"


@dataclass
class PlannedTask:
    """One row of the results: what was asked, what lm-eval runs for it, and what the report says."""

    label: str
    task: str
    shots: int | None
    metric_key: str | None
    report_metric: str | None = None
    reference: float | None = None
    comparison: float | None = None
    percent: bool = True
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)
    score: float | None = None
    built: Any = field(default=None, repr=False)


@dataclass
class EvalSettings:
    model: str
    tasks: list[str]
    suite: str | None = None
    shots: int | None = None
    limit: int | None = None
    batch_size: int = 8
    data_dir: str | None = None
    allow_code_execution: bool = False
    cache_dir: str | None = str(DEFAULT_CACHE_DIR)
    load: LoadOptions = field(default_factory=LoadOptions)
    """How the model was loaded: what of it changes scores is part of the answer cache's key."""
    apply_chat_template: bool | None = None
    """Prompts through the chat template, few-shot examples as earlier turns; None: on for report-chat."""

    @property
    def chat(self) -> bool:
        if self.apply_chat_template is not None:
            return self.apply_chat_template
        return self.suite == "report-chat"

    def __post_init__(self) -> None:
        for name, least in (("shots", 0), ("limit", 1), ("batch_size", 1)):
            value = getattr(self, name)
            if value is not None and value < least:
                raise UsageError(f"{name} must be at least {least}, got {value}")


@dataclass
class Outcome:
    rows: list[PlannedTask]
    partial: list[str]
    record: dict[str, Any]
    samples: dict[str, Any] | None
    requests: dict[str, int] = field(default_factory=dict)
    """Requests of each kind the run needed."""
    from_cache: dict[str, int] = field(default_factory=dict)
    """Of those, how many were answered from the cache instead of the model."""


# ---------------------------------------------------------------------- building tasks


class _LocalDataFactory(TaskFactory):
    """lm-eval's task factory, with every task's dataset read from the data folder instead of the hub."""

    def __init__(self, data_dir: Path, notes: dict[str, list[str]]) -> None:
        super().__init__(meta=None)
        self.data_dir = data_dir
        self.notes = notes

    def _load_full_config(self, entry: Entry, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        cfg = super()._load_full_config(entry, overrides)
        if isinstance(cfg.get("task"), str) and "group" not in cfg and "class" not in cfg:
            self._localize(cfg)
        return cfg

    def _localize(self, cfg: dict[str, Any]) -> None:
        key = local_data.local_key(cfg)
        name = cfg["task"]
        if key not in local_data.SOURCES:
            raise MissingLocalData(
                f"{name}: {self.data_dir} has no local copy of its data ({key}); "
                f"run without --data-dir to download it"
            )
        dataset = local_data.load_local(self.data_dir, key, cfg.get("dataset_name"))
        cfg["custom_dataset"] = lambda **_metadata: dataset
        notes = self.notes.setdefault(name, [])
        source = local_data.SOURCES[key]
        if source.note and source.note not in notes:
            notes.append(source.note)
        eval_split = next((cfg[k] for k in ("test_split", "validation_split") if cfg.get(k) in dataset), None)
        if eval_split is None:
            raise EvalError(f"{name}: the local data for {key} has no {cfg.get('test_split') or cfg.get('validation_split')} split")
        shots = cfg.get("num_fewshot") or 0
        fixed_examples = (cfg.get("fewshot_config") or {}).get("samples") is not None
        for split_key in ("training_split", "validation_split", "test_split", "fewshot_split"):
            split = cfg.get(split_key)
            if split and split not in dataset:
                cfg[split_key] = None
                if shots and not fixed_examples and split_key in ("training_split", "fewshot_split"):
                    note = (f"{name}: few-shot examples come from the {eval_split} split (the local copy has no "
                            f"{split} split); a question's own example is never among them")
                    if note not in notes:
                        notes.append(note)


def task_manager(names: Sequence[str] = (), suite: str | None = None) -> TaskManager:
    """lm-eval's tasks plus ours (CLUEWSC, CHID, the Pile as one set).

    Indexing lm-eval's whole task tree takes tens of seconds; when every name is a report
    benchmark, only the folders that define those are indexed.
    """
    found = [BENCHMARKS.get(n.lower()) or BY_TASK.get(n) for n in names]
    wanted = [b for b in found if b is not None]
    if len(wanted) < len(found):
        return TaskManager(include_path=str(TASKS_DIR))
    benchmarks = [e.benchmark for e in suite_entries(suite)] if suite else []
    benchmarks += wanted
    root = Path(lm_eval.tasks.__file__).parent
    folders = dict.fromkeys(str(root / f) for b in benchmarks for f in b.folders)
    return TaskManager(include_defaults=False, include_path=[*folders, str(TASKS_DIR)])


def resolve(name: str, manager: TaskManager) -> tuple[str, Benchmark | None]:
    """A report benchmark name or an lm-eval task/group name -> (lm-eval name, benchmark)."""
    benchmark = BENCHMARKS.get(name.lower())
    if benchmark is not None:
        return benchmark.task, benchmark
    if name in BY_TASK:
        return name, BY_TASK[name]
    if name in manager.task_index:
        return name, None
    close = difflib.get_close_matches(name, list(manager.task_index) + [b.name for b in BENCHMARKS.values()], n=5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise EvalError(
        f"unknown task {name!r}.{hint} Known: the report's benchmarks "
        f"({', '.join(b.name for b in BENCHMARKS.values())}) or any of lm-eval's {len(manager.task_index)} "
        f"tasks and groups (list them with `lm-eval ls tasks`)"
    )


def plan(settings: EvalSettings, manager: TaskManager) -> list[PlannedTask]:
    """The rows to run, with the report's numbers beside each; raises EvalError on an unknown name."""
    rows: list[PlannedTask] = []
    if settings.suite:
        for entry in suite_entries(settings.suite):
            b = entry.benchmark
            rows.append(PlannedTask(
                label=b.name, task=b.task, shots=entry.shots if settings.shots is None else settings.shots,
                metric_key=b.metric_key, report_metric=entry.metric, reference=entry.reference,
                comparison=entry.comparison, percent=b.percent, notes=[b.note] if b.note else [],
            ))
    for name in settings.tasks:
        task, benchmark = resolve(name, manager)
        shots = settings.shots
        if shots is None and benchmark is not None:
            shots = next((e.shots for e in suite_entries("report") if e.benchmark == benchmark), None)
        row = PlannedTask(label=benchmark.name if benchmark else task, task=task, shots=shots,
                          metric_key=benchmark.metric_key if benchmark else None,
                          percent=benchmark.percent if benchmark else True,
                          notes=[benchmark.note] if benchmark and benchmark.note else [])
        if benchmark is not None:
            row.report_metric, row.reference, row.comparison = report_scores(benchmark, shots)
        rows.append(row)
    return rows


def build(rows: list[PlannedTask], settings: EvalSettings, manager: TaskManager) -> dict[str, list[str]]:
    """Build each row's lm-eval task (this reads its data); suite rows that cannot run are skipped."""
    notes: dict[str, list[str]] = {}
    factory = _LocalDataFactory(Path(settings.data_dir), notes) if settings.data_dir else TaskFactory()
    for row in rows:
        benchmark = BY_TASK.get(row.task)
        if benchmark is not None and benchmark.runs_code and not settings.allow_code_execution:
            if settings.suite:
                row.skipped = "runs generated code: pass --allow-code-execution"
                continue
            raise EvalError(f"{row.task} runs the model's generated code; pass --allow-code-execution to allow it")
        if benchmark is not None and benchmark.runs_code:
            os.environ["HF_ALLOW_CODE_EVAL"] = "1"
        base = benchmark.base if benchmark and benchmark.base else row.task
        overrides: dict[str, Any] = dict(benchmark.overrides) if benchmark and benchmark.base else {}
        if benchmark and benchmark.base:
            overrides["task"] = row.task
        if row.shots is not None:
            overrides["num_fewshot"] = row.shots
        try:
            row.built = factory.build(manager.task_index[base], overrides=overrides or None, registry=manager.task_index)
        except MissingLocalData as exc:
            if not settings.suite:
                raise
            row.skipped = str(exc)
        except EvalError:
            raise
        except Exception as exc:  # datasets and lm-eval raise many kinds; one line says which task
            message = f"{row.task}: cannot load its data or definition ({type(exc).__name__}: {exc})"
            if isinstance(exc, (ImportError, AssertionError)) and "math_verify" in str(exc):
                message = f"{row.task}: its scoring needs {', '.join(_missing_math_packages())}; pip install 'lm-eval[math]'"
            elif "code_eval" in str(exc):
                message = (f"{row.task}: lm-eval scores it with Hugging Face evaluate's code_eval, which is downloaded "
                           f"from the hub; offline, run humaneval or mbpp (scored by dsmoe itself)")
            elif not settings.data_dir:
                message += "; offline, pass --data-dir DIR with local copies"
            if not settings.suite:
                raise EvalError(message) from exc
            row.skipped = message
        else:
            for leaf in _leaves(row.built):
                row.notes.extend(n for n in notes.get(leaf.config.task, []) if n not in row.notes)
    return notes


def _missing_math_packages() -> list[str]:
    """What lm-eval's MATH scoring (minerva_math) lacks: sympy, math_verify, antlr4 runtime 4.11."""
    from importlib.metadata import PackageNotFoundError, version
    from importlib.util import find_spec

    missing = [f"{name} (not installed)" for name in ("sympy", "math_verify") if find_spec(name) is None]
    try:
        antlr = version("antlr4-python3-runtime")
    except PackageNotFoundError:
        missing.append("antlr4-python3-runtime 4.11 (not installed)")
    else:
        if not antlr.startswith("4.11"):
            missing.append(f"antlr4-python3-runtime 4.11 (found {antlr})")
    return missing or ["sympy, math_verify and antlr4-python3-runtime 4.11"]


def _leaves(built: Task | Group | list[Task]) -> list[Task]:
    if isinstance(built, Group):
        return list(built.get_all_tasks())
    if isinstance(built, list):
        return built
    return [built]


def partial_data(row: PlannedTask) -> str | None:
    """Say so when the local copy holds fewer evaluation rows than the full set."""
    leaves = _leaves(row.built)
    by_key: dict[str, list[Task]] = {}
    for leaf in leaves:
        cfg = {"dataset_path": leaf.config.dataset_path, "metadata": leaf.config.metadata}
        by_key.setdefault(local_data.local_key(cfg) or "", []).append(leaf)
    for key, tasks in by_key.items():
        source = local_data.SOURCES.get(key)
        if source is None:
            continue
        have = sum(len(t.eval_docs) for t in tasks)
        if len(tasks) > 1 and key in local_data.GROUP_FULL_ROWS:
            full: int | None = local_data.GROUP_FULL_ROWS[key]
        else:
            sizes = [source.full_rows(t.config.dataset_name) for t in tasks]
            known = [size for size in sizes if size is not None]
            full = sum(known) if len(known) == len(sizes) else None
        if full is not None and have < full:
            return f"{row.label}: partial data, {have:,} of {full:,} evaluation rows"
    return None


# ---------------------------------------------------------------------- running


_SCORING_LOAD_SETTINGS = ("dtype", "bits", "quant_type", "double_quant", "quantize_lm_head", "lm_head")
"""The loading settings that change scores (where the experts live does not: outputs are identical)."""


def cache_path(settings: EvalSettings, lm: DsmoeLM) -> Path | None:
    """Where this model's answers are kept: a file named by the checkpoint's content and the
    settings that change scores, so replaced weights in the same folder never reuse old answers."""
    if not settings.cache_dir:
        return None
    fingerprint = checkpoint_fingerprint(resolve_model_path(settings.model))
    loading = settings.load.record()
    scoring = {**{k: loading[k] for k in _SCORING_LOAD_SETTINGS},
               "max_length": lm.max_length, "share_context": lm.share_context, "batch_size": lm.batch_size}
    return Path(settings.cache_dir) / f"{cache_key(fingerprint, scoring)}.sqlite"


def open_cache(settings: EvalSettings, lm: DsmoeLM) -> EvalCache | None:
    """The run's answer cache, opened (and checked writable) before anything is scored."""
    path = cache_path(settings, lm)
    return None if path is None else EvalCache(path)


def run(lm: DsmoeLM, settings: EvalSettings, rows: list[PlannedTask], manager: TaskManager) -> Outcome:
    """Evaluate the built rows with lm-eval and collect each row's score."""
    runnable = [r for r in rows if r.skipped is None]
    if not runnable:
        raise EvalError("nothing to run: " + "; ".join(f"{r.label}: {r.skipped}" for r in rows))
    started = time.time()
    cache = open_cache(settings, lm)
    cached = CachedLM(lm, cache)
    try:
        results = lm_eval.simple_evaluate(
            model=cached,
            tasks=[r.built for r in runnable],
            limit=settings.limit,
            log_samples=True,
            bootstrap_iters=0,
            confirm_run_unsafe_code=settings.allow_code_execution,
            task_manager=manager,
            # The chat model as it is used: its template around every prompt, and few-shot examples as
            # earlier user/assistant turns (lm-eval's fewshot_as_multiturn), as the report's chat table.
            apply_chat_template=settings.chat,
            fewshot_as_multiturn=settings.chat,
        )
    finally:
        if cache is not None:
            cache.close()
    requests = request_counts(runnable)
    answered = getattr(lm, "answered", None)
    from_cache = {kind: max(n - answered[kind], 0) for kind, n in requests.items()} if answered is not None else {}
    scores = results["results"]
    for row in runnable:
        names = [row.task] + [t.config.task for t in _leaves(row.built)]
        entry: dict[str, Any] = next((scores[n] for n in names if n in scores), {})
        key = row.metric_key or next((k for k in entry if "," in k and "_stderr" not in k), None)
        row.metric_key = key
        value = entry.get(key) if key else None
        row.score = None if value is None or value == "N/A" else float(value) * (100 if row.percent else 1)
    partial = [n for n in (partial_data(r) for r in runnable) if n]
    partial += [f"{r.label}: skipped ({r.skipped})" for r in rows if r.skipped]
    record = {
        "dsmoe_version": _version(),
        "lm_eval_version": lm_eval.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "machine": platform.platform(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "config": {**asdict(settings), "load": settings.load.record(), "max_length": lm.max_length, "share_context": getattr(lm, "share_context", None)},
        "complete": not partial and settings.limit is None,
        "partial": partial,
        "rows": [_row_record(r) for r in rows],
        "cache": None if cache is None else {"path": str(cache.path), "reused": cached.use.reused,
                                             "scored": cached.use.scored},
        "lm_eval": {k: results.get(k) for k in ("results", "groups", "n-samples", "n-shot", "versions", "higher_is_better")},
    }
    record["from_cache"] = from_cache
    return Outcome(rows=rows, partial=partial, record=record, samples=results.get("samples"),
                   requests=requests, from_cache=from_cache)


def request_counts(rows: list[PlannedTask]) -> dict[str, int]:
    """Requests of each kind the rows' tasks built (lm-eval keeps them on each task after a run)."""
    counts: dict[str, int] = {}
    for row in rows:
        for leaf in _leaves(row.built):
            for instance in leaf.instances:
                counts[instance.request_type] = counts.get(instance.request_type, 0) + 1
    return counts


def _row_record(row: PlannedTask) -> dict[str, Any]:
    record = asdict(row)
    record.pop("built")
    return record


def _version() -> str:
    return __version__


def check_writable(path: str | Path, what: str) -> None:
    """Fail now, not after hours of scoring, when an output file cannot be written where asked."""
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{what} {target}: is a folder, not a file")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".probe", dir=target.parent)
    except OSError as exc:
        raise UsageError(f"{what} {target}: cannot write there ({exc.strerror})") from None
    os.close(fd)
    os.unlink(probe)
    if target.exists() and not os.access(target, os.W_OK):
        raise UsageError(f"{what} {target}: cannot write there (the file is read-only)")


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write beside the target and rename, so an interrupted write never leaves a file that looks valid."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, ensure_ascii=False, default=handle_non_serializable)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_samples_atomic(path: str | Path, samples: dict[str, Any]) -> None:
    """One JSON line per sample: task, doc id, prompt arguments, model answers, per-sample metrics."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for task, items in samples.items():
                for item in items:
                    line = {"task": task, **item}
                    handle.write(json.dumps(line, ensure_ascii=False, default=handle_non_serializable) + "\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
