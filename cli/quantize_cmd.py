"""``dsmoe quantize``: convert a checkpoint to bitsandbytes 4- or 8-bit, with a progress bar."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, TypeVar

import typer
from rich.progress import DownloadColumn, TimeRemainingColumn, TransferSpeedColumn

from dsmoe.cli.app import app
from dsmoe.cli.common import (
    ThreadsOption, console, err_console, guarded, human_bytes, progress_report,
    terminate_as_interrupt, use_threads,
)
from dsmoe.errors import UsageError
from dsmoe.loading import LoadOptions
from dsmoe.checkpoint.reader import resolve_model_path
from dsmoe.checkpoint.registry import remember_quantized
from dsmoe.quant.spec import bits_error
from dsmoe.quant.convert import DEFAULT_SHARD_BYTES, quantize_checkpoint

T = TypeVar("T")

DSMOE_LAYOUT = "dsmoe"
LAYOUTS = (DSMOE_LAYOUT, "transformers")


def _one_of(name: str, positional: T | None, flag: str, flagged: T | None) -> T:
    if positional is not None and flagged is not None:
        raise UsageError(f"give {name} or {flag}, not both")
    value = positional if positional is not None else flagged
    if value is None:
        raise UsageError(f"missing {name} (or {flag})")
    return value


@app.command("quantize")
@guarded
def quantize(
    src: str = typer.Argument(None, help="Source checkpoint folder or Hugging Face repo id (unquantized)."),
    dst: Path = typer.Argument(None, help="Output folder (created; must not exist unless --force)."),
    model: str = typer.Option(None, "--model", "-m", help="The source, as a flag (instead of SRC)."),
    output: Path = typer.Option(None, "--output", "-o", help="The output folder, as a flag (instead of DST)."),
    bits: int = typer.Option(4, "--bits", help="4 (nf4/fp4) or 8 (LLM.int8)."),
    quant_type: str = typer.Option(None, "--quant-type", help="4-bit format: nf4 (default) or fp4."),
    double_quant: bool = typer.Option(False, "--double-quant", help="Quantize the 4-bit absmax scales too."),
    layout: str = typer.Option(DSMOE_LAYOUT, "--layout",
                               help="dsmoe: 4-bit weights in the kernels' layout and lm_head quantized, as a run "
                                    "uses them (loads map them); transformers: bitsandbytes' layout, lm_head "
                                    "in floats, loadable by transformers."),
    quantize_lm_head: Optional[bool] = typer.Option(None, "--quantize-lm-head/--no-quantize-lm-head",
                                          help="Store lm_head quantized: q6 with --bits 4, int8 with --bits 8 "
                                               "(or as --lm-head says). Default: with --layout dsmoe."),
    lm_head: str = typer.Option(None, "--lm-head", help="lm_head's stored format (implies --quantize-lm-head): q6 or int8."),
    shard_gb: float = typer.Option(DEFAULT_SHARD_BYTES / 1000**3, "--shard-size", help="Largest output shard, GB."),
    force: bool = typer.Option(False, "--force", help="Replace DST if it exists."),
    threads: int = ThreadsOption,
) -> None:
    """Write SRC quantized to DST, by default as a dsmoe run uses it (a load maps the weights and
    repacks nothing); ``--layout transformers`` writes what transformers loads."""
    if model is not None and src is not None and dst is None and output is None:
        src, dst = None, Path(src)  # ``-m SRC DST``: the one positional is the output
    src, dst = _one_of("SRC", src, "--model", model), _one_of("DST", dst, "--output", output)
    use_threads(threads)
    if bits not in (4, 8):
        raise UsageError(bits_error("--bits", bits, allow_16=False))
    layout = layout.lower()
    if layout not in LAYOUTS:
        raise UsageError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    kernel_layout = layout == DSMOE_LAYOUT
    if quantize_lm_head is None:
        quantize_lm_head = kernel_layout or lm_head is not None
    spec = LoadOptions(bits=bits, quant_type=quant_type, double_quant=double_quant,
                       quantize_lm_head=quantize_lm_head, lm_head=lm_head).quant_spec()
    assert spec is not None  # bits is 4 or 8
    if not (math.isfinite(shard_gb) and shard_gb > 0):
        raise UsageError(f"--shard-size must be a positive number of GB, got {shard_gb}")
    source = resolve_model_path(src)
    columns = (DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with terminate_as_interrupt(), progress_report(f"quantizing to {spec.name}", columns, unit="bytes") as report:
        result = quantize_checkpoint(source, dst, spec, force=force, progress=report,
                                     shard_bytes=int(shard_gb * 1000**3), kernel_layout=kernel_layout)
    remember_quantized(result.dst)  # so that 'dsmoe list' shows it and 'dsmoe rm' may remove it
    for stale in result.removed_partials:
        err_console.print(f"[dim]removed {stale}, left by an interrupted run whose process is gone[/]")
    rate = result.bytes_in / max(result.seconds, 1e-9) / 1e6
    console.print(
        f"wrote {result.dst}: {result.quantized} of {result.tensors} tensors quantized, {result.shards} shard(s), "
        f"{human_bytes(result.bytes_in)} -> {human_bytes(result.bytes_out)} in {result.seconds:.1f} s "
        f"({rate:.0f} MB/s, peak RSS {result.peak_rss_bytes / 2**30:.2f} GiB)"
    )
