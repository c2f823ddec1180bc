"""``dsmoe list``, ``dsmoe pull``, ``dsmoe rm``: the models on this machine, by name."""

from __future__ import annotations

import json

import typer
from rich.markup import escape
from rich.table import Table

from dsmoe.cli.app import app
from dsmoe.cli.common import console, err_console, full_width, guarded, human_bytes
from dsmoe.checkpoint.registry import list_models, pull, remove


@app.command("list")
@guarded
def list_command(as_json: bool = typer.Option(False, "--json", help="Print the list as JSON.")) -> None:
    """DeepSeekMoE checkpoints in the Hugging Face cache and the folders 'dsmoe quantize' wrote."""
    models = list_models()
    if as_json:
        console.print_json(json.dumps([{"name": m.name, "path": str(m.path), "source": m.source, "size_bytes": m.size_bytes,
                                        "format": m.format, "layers": m.layers} for m in models]))
        return
    if not models:
        err_console.print("no models yet: 'dsmoe pull REPO_ID' downloads one, 'dsmoe quantize' writes one")
        return
    table = Table(title="models on this machine", title_justify="left")
    for column in ("name", "format", "layers", "size", "where"):
        table.add_column(column, justify="right" if column in ("layers", "size") else "left")
    for m in models:
        table.add_row(escape(m.name), m.format, "" if m.layers is None else str(m.layers), human_bytes(m.size_bytes),
                      "Hugging Face cache" if m.source == "hf-cache" else "dsmoe quantize")
    console.print(full_width(table))


@app.command("pull")
@guarded
def pull_command(
    repo_id: str = typer.Argument(..., help="A Hugging Face repo id, e.g. deepseek-ai/deepseek-moe-16b-chat."),
    revision: str = typer.Option(None, "--revision", help="A branch, tag or commit (default: main)."),
) -> None:
    """Download a checkpoint (only the files dsmoe reads) into the Hugging Face cache; run again to resume."""
    path = pull(repo_id, revision)
    console.print(f"{escape(repo_id)}: ready at {escape(str(path))} (use it as --model {escape(repo_id)})", soft_wrap=True)


@app.command("rm")
@guarded
def rm_command(name: str = typer.Argument(..., help="A name as 'dsmoe list' shows it: a repo id or a quantized folder.")) -> None:
    """Delete a model: a repo from the Hugging Face cache, or a folder 'dsmoe quantize' wrote."""
    removed = remove(name)
    console.print(f"removed {escape(removed.name)} ({human_bytes(removed.size_bytes)})", soft_wrap=True)
