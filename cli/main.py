"""Entry point: global flags, then the commands (each module registers its own on ``app``)."""

from __future__ import annotations

import sys

import typer

from dsmoe.cli import bench_cmd, chat_cmd, eval_cmd, generate_cmd, info_cmd, quantize_cmd, simulate_cmd  # noqa: F401  (registers the commands)
from dsmoe.cli import serve_cmd  # noqa: F401  (registers the command)
from dsmoe.cli.app import app
from dsmoe.cli.common import err_console, set_debug


def _version(value: bool) -> None:
    if value:
        from dsmoe import __version__

        typer.echo(f"dsmoe {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Run DeepSeekMoE language models locally."""
    set_debug(debug)


def main() -> None:
    """Run the app; a bad flag or value is one line on stderr and exit code 2, not a panel."""
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        sys.exit(130)
    except typer.TyperException as exc:
        # Typer's usage errors (unknown flag, a value of the wrong kind) as one line.
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        err_console.print(f"[bold red]error:[/] {message}{hint}", soft_wrap=True, markup=True)
        sys.exit(getattr(exc, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)
