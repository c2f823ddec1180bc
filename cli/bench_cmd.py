"""``dsmoe bench``: prefill and decode speed, memory and roofline fraction of one configuration."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from dsmoe.perf.runner import BenchResult, measure_bandwidth, run_benchmark
from dsmoe.perf.synthetic import SyntheticCheckpoint, save_checkpoint
from dsmoe.cli.app import app
from dsmoe import loading
from dsmoe.cli.common import (
    ThreadsOption, console, default_model, err_console, full_width, guarded, human_bytes, use_threads,
)
from dsmoe.cli.loading import load_flags, load_lines
from dsmoe.cli.offload_view import plan_table
from dsmoe.errors import UsageError
from dsmoe.loading import LoadOptions
from dsmoe.checkpoint.reader import open_checkpoint
from dsmoe.offload import TraceHeader, TraceRecorder, store_of
from dsmoe.quant import Linear6bit, Linear8bit, spec_from_config


def _render(result: BenchResult) -> None:
    table = Table(title=f"dsmoe bench: {result.model}", show_header=False, title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    hit = "n/a (all experts resident)" if result.expert_cache_hit_rate is None else f"{result.expert_cache_hit_rate:.1%}"
    rows = [
        ("weights", "bf16" if result.bits == 16 else f"{result.bits}-bit"),
        ("threads", str(result.threads)),
        ("load", f"{result.load_seconds:.1f} s"),
        (f"prefill ({result.prompt_tokens} tokens)", f"{result.prefill_tokens_per_s:.1f} tok/s"),
        (f"decode ({result.new_tokens} tokens)", f"{result.decode_tokens_per_s:.2f} tok/s"),
        ("time to first token", f"{result.time_to_first_token_s * 1000:.0f} ms"),
        ("peak RSS", human_bytes(result.peak_rss_bytes)),
        ("weight bytes per token", human_bytes(result.bytes_per_token)),
        ("memory bandwidth (measured)", f"{human_bytes(result.bandwidth_bytes_per_s)}/s"),
        ("roofline fraction", f"{result.roofline_fraction:.1%}"),
        ("expert-cache hit rate", hit),
        ("native decode kernels", result.native_kernels),
    ]
    expected = result.expected_link_bytes_per_token or {}
    for link, moved in (result.decode_link_bytes_per_token or {}).items():
        plan = f" (plan, even routing: {human_bytes(expected[link])})" if link in expected else ""
        rows.append((f"{link} per decoded token", f"{human_bytes(moved)}{plan}"))
    if result.expert_host_runs:
        rows.append(("misses run on the host", str(result.expert_host_runs)))
    for link, rate in (result.link_bytes_per_s or {}).items():
        probe = result.disk_probe_bytes_per_s if link.startswith("disk") else None
        device = f" (the disk alone: {human_bytes(probe)}/s)" if probe else ""
        rows.append((f"{link} while reading", f"{human_bytes(rate)}/s{device}"))
    for key, value in rows:
        table.add_row(key, value)
    console.print(full_width(table))


def _save_synthetic(checkpoint: SyntheticCheckpoint, dst: Path) -> None:
    with Progress(TextColumn(f"writing {dst}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=err_console, transient=True) as progress:
        task = progress.add_task("save", total=checkpoint.total_bytes())
        save_checkpoint(checkpoint, dst, progress=lambda done, total: progress.update(task, completed=done))


@app.command("bench")
@guarded
@load_flags
def bench(
    model: str = typer.Option(None, "--model", "-m", help="Checkpoint folder or repo id (default: the demo model)."),
    synthetic: str = typer.Option(None, "--synthetic", help="Random weights at a real geometry: 16b, 16b:layers=N; add ,skew=S for a skewed router."),
    prompt_tokens: int = typer.Option(64, "--prompt-tokens", min=1),
    new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", min=2, help="Tokens to decode."),
    old_new_tokens: int = typer.Option(None, "--new-tokens", min=2, hidden=True),  # the name before -n
    threads: int = ThreadsOption,
    seed: int = typer.Option(0, "--seed"),
    save: Path = typer.Option(None, "--save", help="With --synthetic: write the weights as a bf16 HF checkpoint and exit."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    trace: Path = typer.Option(None, "--trace", help="Record every MoE layer's routed experts (and an expert "
                               "store's prefetch guesses) to this file, for 'dsmoe simulate' and 'dsmoe info --plan --trace'."),
    *,
    load: LoadOptions,
) -> None:
    """Measure prefill and decode tokens/s, time to first token, peak RSS and roofline fraction.

    --bits defaults to 16 (the checkpoint's floats), or the stored format of a quantized checkpoint.
    """
    if model and synthetic:
        raise UsageError("give --model or --synthetic, not both")
    new_tokens = old_new_tokens or new_tokens
    use_threads(threads)
    source = SyntheticCheckpoint(synthetic, seed=seed) if synthetic else open_checkpoint(model or default_model())
    if save is not None:
        if not isinstance(source, SyntheticCheckpoint):
            raise UsageError("--save writes a synthetic checkpoint: add --synthetic")
        _save_synthetic(source, save)
        err_console.print(f"wrote {save}")
        return
    stored = source.config.quantization_config
    if stored is not None:
        spec = spec_from_config(stored)
        bits = spec.bits
    else:
        bits = load.bits or 16
    if synthetic and load.max_ram is not None:
        raise UsageError("--max-ram reads experts from a checkpoint on disk: write one with --save, "
                         "then bench it with --model")
    bandwidth = measure_bandwidth()  # before loading: its 1 GB buffer must not add to the run's peak RSS
    started = time.perf_counter()
    loaded, _ = loading.load(source, load)
    for line in load_lines(loaded):
        err_console.print(line, markup=False)
    store = store_of(loaded)
    if store is not None:
        err_console.print(plan_table(store.plan))
    load_seconds = time.perf_counter() - started
    name = f"synthetic {synthetic}" if synthetic else str(source.path)
    lm_head_bits = 8 if isinstance(loaded.lm_head, Linear8bit) else 6 if isinstance(loaded.lm_head, Linear6bit) else 16  # as loaded, whatever decided it
    with contextlib.ExitStack() as recording:
        if trace is not None:
            header = TraceHeader.for_model(loaded, store.plan.expert_bytes if store else None, name)
            recorder = recording.enter_context(TraceRecorder(trace, header))  # kept only if the run finishes
            loaded.set_routing_observer(recorder, recorder.guessed)
        result = run_benchmark(loaded, name, bits, load_seconds, prompt_tokens, new_tokens, seed=seed,
                               bandwidth=bandwidth, lm_head_bits=lm_head_bits, store=store)
    if as_json:
        console.print_json(json.dumps(result.to_dict()))
    else:
        _render(result)
