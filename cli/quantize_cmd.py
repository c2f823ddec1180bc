"""``dsmoe quantize``: convert a checkpoint to bitsandbytes 4- or 8-bit, with a progress bar."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import (
    BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn,
)

from dsmoe.cli.app import app
from dsmoe.cli.common import console, err_console, guarded
from dsmoe.model.checkpoint import resolve_model_path
from dsmoe.quant import QuantSpec
from dsmoe.quant.convert import DEFAULT_SHARD_BYTES, quantize_checkpoint


@app.command("quantize")
@guarded
def quantize(
    src: str = typer.Argument(..., help="Source checkpoint folder or Hugging Face repo id (unquantized)."),
    dst: Path = typer.Argument(..., help="Output folder (created; must not exist unless --force)."),
    bits: int = typer.Option(4, "--bits", help="4 (nf4/fp4) or 8 (LLM.int8)."),
    quant_type: str = typer.Option(None, "--quant-type", help="4-bit format: nf4 (default) or fp4."),
    double_quant: bool = typer.Option(False, "--double-quant", help="Quantize the 4-bit absmax scales too."),
    quantize_lm_head: bool = typer.Option(False, "--quantize-lm-head", help="Store lm_head in 8-bit."),
    shard_gb: float = typer.Option(DEFAULT_SHARD_BYTES / 1000**3, "--shard-size", help="Largest output shard, GB."),
    force: bool = typer.Option(False, "--force", help="Replace DST if it exists."),
) -> None:
    """Write SRC quantized to DST in the layout transformers uses for bitsandbytes checkpoints."""
    spec = QuantSpec(
        bits=bits, quant_type=quant_type or ("nf4" if bits == 4 else "int8"), double_quant=double_quant,
        quantize_lm_head=quantize_lm_head,
    )
    source = resolve_model_path(src)
    with Progress(
        TextColumn(f"quantizing to {spec.name}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=err_console, transient=True,
    ) as progress:
        task = progress.add_task("convert", total=None)

        def report(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        result = quantize_checkpoint(source, dst, spec, force=force, progress=report,
                                     shard_bytes=int(shard_gb * 1000**3))
    rate = result.bytes_in / max(result.seconds, 1e-9) / 1e6
    console.print(
        f"wrote {result.dst}: {result.quantized} of {result.tensors} tensors quantized, {result.shards} shard(s), "
        f"{result.bytes_in / 1e9:.2f} GB -> {result.bytes_out / 1e9:.2f} GB in {result.seconds:.1f} s "
        f"({rate:.0f} MB/s, peak RSS {result.peak_rss_bytes / 2**30:.2f} GiB)"
    )
