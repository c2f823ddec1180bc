"""``dsmoe perplexity``: perplexity of a text, and KL divergence against a saved base run (llama-perplexity)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from dsmoe.cli.app import app
from dsmoe.cli.common import (
    ModelOption, ThreadsOption, console, default_model, err_console,
    full_width, guarded, progress_report, read_text_file, use_threads,
)
from dsmoe.cli.loading import load_flags, load_with_progress
from dsmoe.errors import UsageError
from dsmoe.loading import LoadOptions
from dsmoe.checkpoint.reader import resolve_model_path
from dsmoe.quality.perplexity import (
    DEFAULT_TOP_K, PerplexityResult, check_base, load_base, perplexity, save_base, tokenizer_sha256,
)

DEFAULT_CTX = 512  # llama-perplexity's default


def _render(result: PerplexityResult, name: str, label: str) -> Table:
    table = Table(title=f"dsmoe perplexity: {name} ({label})", show_header=False, title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    table.add_row("scored tokens", f"{result.tokens} in {result.chunks} chunks of {result.ctx} (second halves)")
    table.add_row("perplexity", f"{result.ppl:.4f} ± {result.ppl_err:.4f}")
    if result.kld is not None:
        k = result.kld
        table.add_row("KL divergence, mean", f"{k.mean:.6f} ± {k.mean_err:.6f}")
        table.add_row("KL divergence, 99th percentile", f"{k.p99:.6f}")
        table.add_row("KL divergence, median / max", f"{k.median:.6f} / {k.max:.6f}")
        table.add_row("same top token", f"{100 * k.same_top:.2f} ± {100 * k.same_top_err:.2f} %")
    return full_width(table)


def _plot(result: PerplexityResult, path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'dsmoe[plot]'") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    assert result.kld is not None
    figure, axis = plt.subplots(figsize=(8, 3.5))
    axis.plot(range(1, len(result.kld.chunk_means) + 1), result.kld.chunk_means, marker="o", markersize=3)
    axis.set_xlabel(f"chunk ({result.ctx} tokens)")
    axis.set_ylabel("mean KL divergence")
    axis.set_title(title, fontsize=10)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.grid(alpha=0.3)
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=120)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
    finally:
        plt.close(figure)


def _format_label(load: LoadOptions) -> str:
    """What ran, as the QUANTIZATION.md table names it: ``nf4-dq + lm_head int8, bf16 compute``."""
    dtype = load.record()["dtype"]
    if load.load_bits is None:
        return f"{dtype} (unquantized)"
    name = "int8" if load.bits == 8 else (load.quant_type or "nf4") + ("-dq" if load.double_quant else "")
    head = load.lm_head_format()
    return f"{name}{f' + lm_head {head}' if head else ''}, {dtype} compute"


@app.command("perplexity")
@guarded
@load_flags
def perplexity_command(
    text_file: Path = typer.Option(None, "--file", "-f", help="The text to score (UTF-8), e.g. WikiText-2's test split."),
    model: str = ModelOption,
    ctx_size: int = typer.Option(None, "--ctx-size", "-c", min=4,
                                 help=f"Tokens per chunk (default {DEFAULT_CTX}, or the model's context if shorter)."),
    save_logits: Path = typer.Option(None, "--save-logits", help="Save this run's top-k log-probabilities as a base for --kld."),
    kld: Path = typer.Option(None, "--kld", help="Compare against a base saved with --save-logits: KL divergence, same top token."),
    plot: Path = typer.Option(None, "--plot", help="With --kld: write a plot of each chunk's mean KL divergence (PNG)."),
    top_k: int = typer.Option(DEFAULT_TOP_K, "--top-k", min=1, help="Log-probabilities kept per token by --save-logits."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    threads: int = ThreadsOption,
    *,
    load: LoadOptions,
) -> None:
    """Perplexity of a text (± its uncertainty); against a saved base, KL divergence and same-top-token rate."""
    if text_file is None:
        raise UsageError("give the text to score with -f FILE")
    if plot is not None and kld is None:
        raise UsageError("--plot draws the KL divergence per chunk: add --kld BASE")
    text = read_text_file(text_file)
    base = load_base(kld) if kld is not None else None
    use_threads(threads)
    path = resolve_model_path(model or default_model())
    loaded, tokenizer = load_with_progress(str(path), load)
    if tokenizer is None:
        raise UsageError("this checkpoint has no tokenizer.json, so it cannot score a text")
    limit = loaded.config.max_position_embeddings
    ctx = ctx_size or min(DEFAULT_CTX, limit)
    if ctx > limit:
        raise UsageError(f"--ctx-size {ctx} is longer than the model's context ({limit})")
    ids = tokenizer.encode(text, add_bos=False)
    tokenizer_hash = tokenizer_sha256(path)
    if base is not None:
        check_base(base, str(kld), ids, ctx, tokenizer_hash)
    with progress_report("scoring", unit=" chunks") as report:
        result = perplexity(loaded, ids, ctx, base=base, keep_top_k=top_k if save_logits else None, progress=report)
    label = _format_label(load)
    if save_logits is not None:
        assert result.base is not None
        result.base.tokenizer_sha256, result.base.model = tokenizer_hash, f"{path.name} ({label})"
        save_base(result.base, save_logits)
        err_console.print(f"saved the top-{top_k} log-probabilities of {result.tokens} tokens to {save_logits}",
                          markup=False, soft_wrap=True)
    if plot is not None:
        _plot(result, plot, f"{path.name} ({label})\nagainst {base.model if base else ''}")
        err_console.print(f"wrote {plot}", markup=False)
    if as_json:
        record = {"model": str(path), "format": label, "ctx": result.ctx, "chunks": result.chunks,
                  "tokens": result.tokens, "ppl": result.ppl, "ppl_err": result.ppl_err}
        if result.kld is not None:
            k = result.kld
            record.update(kld_mean=k.mean, kld_mean_err=k.mean_err, kld_p99=k.p99, kld_median=k.median,
                          kld_max=k.max, same_top=k.same_top, same_top_err=k.same_top_err, base=base.model if base else None)
        console.print_json(json.dumps(record))
    else:
        console.print(_render(result, str(path), label))
