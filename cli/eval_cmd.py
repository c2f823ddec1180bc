"""``dsmoe eval``: benchmark scores beside the DeepSeekMoE report's."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Self

import typer
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
)
from rich.table import Table

from dsmoe.cli.app import app
from dsmoe.cli.common import (
    CtxSizeOption, ModelOption, ThreadsOption, console, default_model,
    err_console, full_width, guarded, use_threads,
)
from dsmoe.cli.loading import load_flags, load_with_progress
from dsmoe.loading import LoadOptions
from dsmoe.errors import UsageError


@app.command("eval")
@guarded
@load_flags
def eval_command(
    task: str = typer.Option(None, "--task", help="Benchmarks, comma-separated: report names (MMLU, GSM8K) or lm-eval task names."),
    suite: str = typer.Option(None, "--suite", help="report (base model, table 4) or report-chat (chat model, table 5)."),
    model: str = ModelOption,
    shots: int = typer.Option(None, "--shots", help="Few-shot examples (default: the report's for suite rows, else the task's)."),
    limit: int = typer.Option(None, "--limit", help="Evaluate only the first N documents of each task."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per forward pass."),
    output: Path = typer.Option(None, "--output", "-o", help="Write the results JSON here."),
    log_samples: Path = typer.Option(None, "--log-samples", help="Write every sample's prompt, answer and score here (JSON lines)."),
    data_dir: Path = typer.Option(None, "--data-dir", help="Local benchmark data laid out like shared/evaldata (default: download)."),
    allow_code_execution: bool = typer.Option(False, "--allow-code-execution", help="Run the model's programs with the tests (HumanEval, MBPP): each in a subprocess with time, memory and process limits, and no network or view of other processes where unshare works; it can still read and write your files (docs/RELIABILITY.md)."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Where answers are kept so an interrupted run resumes (default ~/.cache/dsmoe/eval)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither reuse nor keep answers, nor the quantized weights (--bits)."),
    no_shared_context: bool = typer.Option(False, "--no-shared-context", help="Recompute a question's context for every choice."),
    ctx_size: int = CtxSizeOption,
    threads: int = ThreadsOption,
    chat_template: bool = typer.Option(None, "--chat-template/--no-chat-template", help="Prompts through the chat template, few-shot examples as turns (default: on for --suite report-chat)."),
    engine: str = typer.Option("dsmoe", "--engine", help="dsmoe (this runtime) or vllm (lm-eval's vLLM model: GPUs, tensor/data parallel; pip install 'dsmoe[vllm]')."),
    tensor_parallel: int = typer.Option(1, "--tensor-parallel", help="With --engine vllm: GPUs per model copy."),
    data_parallel: int = typer.Option(1, "--data-parallel", help="With --engine vllm: model copies."),
    *,
    load: LoadOptions,
) -> None:
    """Score a model on benchmarks with lm-eval and show the report's numbers beside ours."""
    from dsmoe.evals import DsmoeLM
    from dsmoe.evals.quiet import quiet_libraries
    from dsmoe.evals.runner import (
        DEFAULT_CACHE_DIR, EvalSettings, build, check_writable, plan, run, task_manager, write_json_atomic,
        write_samples_atomic,
    )

    use_threads(threads)
    names = [n.strip() for n in (task or "").split(",") if n.strip()]
    if not names and not suite:
        raise UsageError("give --task NAME[,NAME...] or --suite report|report-chat")
    if engine not in ("dsmoe", "vllm"):
        raise UsageError(f"--engine {engine}: dsmoe or vllm")
    if engine == "vllm":
        from dsmoe.evals.vllm_engine import require_vllm

        dsmoe_only = [flag for flag, given in (("--bits", load.bits is not None), ("--quant-type", load.quant_type is not None),
                                               ("expert-store budgets", load.offloaded),
                                               ("--no-shared-context", no_shared_context)) if given]
        if dsmoe_only:
            raise UsageError(f"{', '.join(dsmoe_only)}: dsmoe's own options; vLLM runs the checkpoint's weights with its kernels")
        require_vllm()
    if data_dir is not None and not data_dir.is_dir():
        raise UsageError(f"--data-dir {data_dir}: no such folder")
    for flag, path in (("--output", output), ("--log-samples", log_samples)):
        if path is not None:
            check_writable(path, flag)
    settings = EvalSettings(
        model=model or default_model(), tasks=names, suite=suite, shots=shots, limit=limit, batch_size=batch_size,
        data_dir=str(data_dir) if data_dir else None, allow_code_execution=allow_code_execution,
        cache_dir=None if no_cache else str(cache_dir or DEFAULT_CACHE_DIR), load=load,
        apply_chat_template=chat_template,
    )
    # lm-eval logs every step at INFO, warns about choices we make on purpose and draws a tqdm bar per
    # task, datasets one per map: our own progress and output say what matters (errors still show).
    with quiet_libraries():
        manager = task_manager(names, suite)
        rows = plan(settings, manager)
        with err_console.status("reading benchmark data"):
            build(rows, settings, manager)
    if engine == "vllm":
        from dsmoe.evals.vllm_engine import vllm_lm, vllm_model_args

        with quiet_libraries():
            lm: Any = vllm_lm(vllm_model_args(settings.model, str(load.dtype), tensor_parallel, data_parallel, max_length=ctx_size))
            outcome = run(lm, settings, rows, manager)
    else:
        loaded, tokenizer = load_with_progress(settings.model, load)
        view = _ProgressView()
        with quiet_libraries(), view:
            lm = DsmoeLM(model=loaded, tokenizer=tokenizer, batch_size=batch_size, max_length=ctx_size,
                         share_context=not no_shared_context, progress=view.progress, estimate=view.estimate)
            outcome = run(lm, settings, rows, manager)
    for kind, n in outcome.from_cache.items():
        if n:
            console.print(f"[dim]cache:[/] {n:,} of {outcome.requests[kind]:,} {kind} answers came from the cache "
                          f"({settings.cache_dir}); --no-cache recomputes them")
    console.print(full_width(_table(outcome.rows, suite)))
    for note in sorted({n for r in outcome.rows for n in r.notes}):
        console.print(f"[dim]note:[/] {note}")
    for line in outcome.partial:
        console.print(f"[yellow]partial:[/] {line}")
    if limit is not None:
        console.print(f"[yellow]partial:[/] limited to the first {limit} documents of each task")
    if suite:
        console.print("[dim]The report used its own evaluation code; lm-eval's prompts and scoring differ, "
                      "so expect gaps of a few points.[/]")
    if output is not None:
        write_json_atomic(output, outcome.record)
        console.print(f"results written to {output}")
    if log_samples is not None and outcome.samples is not None:
        write_samples_atomic(log_samples, outcome.samples)
        console.print(f"samples written to {log_samples}")


PLAIN_PROGRESS_SECONDS = 30.0
"""Without a terminal (a log file, CI), one progress line per request kind this often."""


class _ProgressView:
    """The run's estimate and progress: a live bar on a terminal, plain lines every N seconds otherwise."""

    def __init__(self) -> None:
        self.live = err_console.is_terminal
        self.bars: dict[str, TaskID] = {}
        self.started: dict[str, float] = {}
        self.last_line: dict[str, float] = {}
        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("ETA"), TimeRemainingColumn(), console=err_console, transient=True,
        ) if self.live else None

    def __enter__(self) -> Self:
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)  # type: ignore[arg-type]  # passes on what __exit__ was given

    def estimate(self, estimate: Any) -> None:
        projected = estimate.projected_seconds
        if projected is None:
            line = f"{estimate.kind}: {estimate.requests:,} requests, {estimate.tokens:,} tokens to compute"
        else:
            rate = estimate.warmup_tokens / estimate.warmup_seconds
            line = (f"{estimate.kind}: {rate:,.0f} tokens/s over a {estimate.warmup_seconds:.1f} s warm-up: "
                    f"about {_duration(projected)} in all")
        err_console.print(line, markup=False, highlight=False, soft_wrap=True)

    def progress(self, kind: str, done: int, total: int) -> None:
        now = time.monotonic()
        self.started.setdefault(kind, now)
        if self.bar is not None:
            if kind not in self.bars:
                self.bars[kind] = self.bar.add_task(kind, total=total)
            self.bar.update(self.bars[kind], completed=done, total=total)
            return
        if done < total and now - self.last_line.get(kind, self.started[kind]) < PLAIN_PROGRESS_SECONDS:
            return
        self.last_line[kind] = now
        elapsed = now - self.started[kind]
        left = f", about {_duration(elapsed / done * (total - done))} left" if 0 < done < total else ""
        err_console.print(f"{kind}: {done:,}/{total:,} requests, {_duration(elapsed)}{left}",
                          markup=False, highlight=False, soft_wrap=True)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _table(rows, suite: str | None) -> Table:
    from dsmoe.evals.suites import SUITES

    names = SUITES[suite] if suite else SUITES["report"]
    table = Table(title="dsmoe eval")
    for column in ("benchmark", "metric", "shots", "ours", names.reference_model, names.comparison_model):
        table.add_column(column, justify="left" if column in ("benchmark", "metric") else "right")
    for row in rows:
        ours = ("[dim]skipped[/]" if row.skipped else "[dim]n/a[/]") if row.score is None else _fmt(row.score, row.percent)
        table.add_row(
            row.label, (row.metric_key or "").split(",")[0], "" if row.shots is None else str(row.shots), ours,
            "" if row.reference is None else _fmt(row.reference, row.percent),
            "" if row.comparison is None else _fmt(row.comparison, row.percent),
        )
    return table


def _fmt(value: float, percent: bool) -> str:
    return f"{value:.1f}" if percent else f"{value:.3f}"
