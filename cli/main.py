"""Entry point: global flags, then the commands (each module registers its own on ``app``)."""

from __future__ import annotations

import sys

import typer
from rich.markup import escape

from dsmoe.cli import bench_cmd, chat_cmd, eval_cmd, generate_cmd, info_cmd, quantize_cmd, simulate_cmd  # noqa: F401  (registers the commands)
from dsmoe.cli import serve_cmd  # noqa: F401  (registers the command)
from dsmoe.cli import models_cmd, perplexity_cmd  # noqa: F401
from dsmoe.cli.app import app
from dsmoe.cli.common import PLAIN_WIDTH, check_utf8_arguments, console, err_console, set_debug
from dsmoe import __version__
from dsmoe.errors import DsmoeError


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dsmoe {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors (before or after the command)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Run DeepSeekMoE language models locally."""
    if debug:  # main() has already taken --debug out of the arguments; this covers app() called directly
        set_debug(True)


def _take_debug(args: list[str]) -> tuple[list[str], bool]:
    """``--debug`` anywhere before a ``--`` counts, so ``dsmoe info X --debug`` works like ``dsmoe --debug info X``."""
    end = args.index("--") if "--" in args else len(args)
    head = [a for a in args[:end] if a != "--debug"]
    return head + args[end:], len(head) < end


def main() -> None:
    """Run the app; a bad flag or value is one line on stderr and a non-zero exit, not a panel."""
    args, debug = _take_debug(sys.argv[1:])
    set_debug(debug)
    for shown in (console, err_console):
        if not shown.is_terminal:
            shown.width = PLAIN_WIDTH
    if not args:
        args = ["--help"]  # the help, and exit 0: no command is not a mistake
    try:
        check_utf8_arguments(args)
    except DsmoeError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True, markup=True)
        sys.exit(2)
    try:
        code = app(args=args, prog_name="dsmoe", standalone_mode=False)
    except typer.Abort:
        sys.exit(130)
    except DsmoeError as exc:
        # A flag's own check (--bits, --quant-type) fails while typer parses.
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True, markup=True)
        sys.exit(1)
    except typer.TyperException as exc:
        # Typer's usage errors (unknown flag, a value of the wrong kind) as one line.
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        err_console.print(f"[bold red]error:[/] {message}{hint}", soft_wrap=True, markup=True)
        sys.exit(getattr(exc, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)
