"""``dsmoe eval``: benchmark scores beside the DeepSeekMoE report's."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from dsmoe.cli.app import app
from dsmoe.cli.common import (
    BitsOption, CtxSizeOption, DtypeOption, ModelOption, QuantTypeOption, ThreadsOption, console, default_model,
    err_console, full_width, guarded, use_threads,
)
from dsmoe.cli.loading import load_with_progress
from dsmoe.cli.offload_view import ExpertCacheOption, GpuMemOption, MaxRamOption, PolicyOption, PrefetchOption
from dsmoe.errors import UsageError
from dsmoe.offload import requested_offload


@app.command("eval")
@guarded
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
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither reuse nor keep answers."),
    no_shared_context: bool = typer.Option(False, "--no-shared-context", help="Recompute a question's context for every choice."),
    ctx_size: int = CtxSizeOption,
    threads: int = ThreadsOption,
    dtype: str = DtypeOption,
    bits: int = BitsOption,
    quant_type: str = QuantTypeOption,
    expert_cache: int = ExpertCacheOption,
    gpu_mem: float = GpuMemOption,
    max_ram: float = MaxRamOption,
    policy: str = PolicyOption,
    prefetch: bool = PrefetchOption,
) -> None:
    """Score a model on benchmarks with lm-eval and show the report's numbers beside ours."""
    from dsmoe.evals import DsmoeLM
    from dsmoe.evals.quiet import quiet_libraries
    from dsmoe.evals.runner import (
        DEFAULT_CACHE_DIR, EvalSettings, build, check_writable, plan, run, task_manager, write_json_atomic,
        write_samples_atomic,
    )

    use_threads(threads)
    offload = requested_offload(expert_cache, gpu_mem, max_ram, policy, prefetch)
    names = [n.strip() for n in (task or "").split(",") if n.strip()]
    if not names and not suite:
        raise UsageError("give --task NAME[,NAME...] or --suite report|report-chat")
    if data_dir is not None and not data_dir.is_dir():
        raise UsageError(f"--data-dir {data_dir}: no such folder")
    for flag, path in (("--output", output), ("--log-samples", log_samples)):
        if path is not None:
            check_writable(path, flag)
    settings = EvalSettings(
        model=model or default_model(), tasks=names, suite=suite, shots=shots, limit=limit, batch_size=batch_size,
        data_dir=str(data_dir) if data_dir else None, allow_code_execution=allow_code_execution,
        cache_dir=None if no_cache else str(cache_dir or DEFAULT_CACHE_DIR), dtype=dtype, bits=bits, quant_type=quant_type,
    )
    # lm-eval logs every step at INFO, warns about choices we make on purpose and draws a tqdm bar per
    # task, datasets one per map: our own progress and output say what matters (errors still show).
    with quiet_libraries():
        manager = task_manager(names, suite)
        rows = plan(settings, manager)
        with err_console.status("reading benchmark data"):
            build(rows, settings, manager)
    loaded, tokenizer = load_with_progress(settings.model, dtype, bits, quant_type, offload)
    with quiet_libraries(), _progress() as progress:
        bars: dict[str, int] = {}

        def report(kind: str, done: int, total: int) -> None:
            if kind not in bars:
                bars[kind] = progress.add_task(kind, total=total)
            progress.update(bars[kind], completed=done, total=total)

        lm = DsmoeLM(model=loaded, tokenizer=tokenizer, batch_size=batch_size, max_length=ctx_size,
                     share_context=not no_shared_context, progress=report)
        outcome = run(lm, settings, rows, manager)
    console.print(full_width(_table(outcome.rows, suite)))
    for note in sorted({n for r in outcome.rows for n in r.notes}):
        console.print(f"[dim]note:[/] {note}")
    for line in outcome.partial:
        console.print(f"[yellow]partial:[/] {line}")
    cache = outcome.record.get("cache")
    if cache and cache["reused"]:
        console.print(f"[dim]resumed: {cache['reused']} answers from the cache, {cache['scored']} scored now[/]")
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


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("ETA"), TimeRemainingColumn(), console=err_console, transient=True,
    )


def _table(rows, suite: str | None) -> Table:  # type: ignore[no-untyped-def]
    from dsmoe.evals.suites import SUITES

    names = SUITES[suite] if suite else SUITES["report"]
    table = Table(title="dsmoe eval")
    for column in ("benchmark", "metric", "shots", "ours", names.reference_model, names.comparison_model):
        table.add_column(column, justify="left" if column in ("benchmark", "metric") else "right")
    for row in rows:
        ours = ("[dim]skipped[/]" if row.skipped else "[dim]n/a[/]") if row.score is None else _fmt(row.score, row.percent)
        table.add_row(
            row.label, row.report_metric or row.metric_key or "", "" if row.shots is None else str(row.shots), ours,
            "" if row.reference is None else _fmt(row.reference, row.percent),
            "" if row.comparison is None else _fmt(row.comparison, row.percent),
        )
    return table


def _fmt(value: float, percent: bool) -> str:
    return f"{value:.1f}" if percent else f"{value:.3f}"
