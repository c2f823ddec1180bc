"""What every command shares: the consoles, error display, and the model-loading flags."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console

from dsmoe.errors import DsmoeError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

_debug = False

F = TypeVar("F", bound=Callable[..., Any])


def set_debug(value: bool) -> None:
    global _debug
    _debug = value


def guarded(command: F) -> F:
    """Show a DsmoeError as one red line and exit 1; a traceback only with --debug."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except DsmoeError as exc:
            if _debug:
                raise
            err_console.print(f"[bold red]error:[/] {exc}", markup=True, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            if _debug:
                raise
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


ModelOption = typer.Option(None, "--model", "-m", help="Checkpoint folder or Hugging Face repo id (default: the bundled demo model).")
DtypeOption = typer.Option("bf16", "--dtype", help="Compute dtype: bf16, fp16 or fp32.")
BitsOption = typer.Option(None, "--bits", help="Quantize while loading: 4 or 8 (16 = no quantization).")
QuantTypeOption = typer.Option(None, "--quant-type", help="4-bit format: nf4 (default) or fp4.")


def default_model() -> str:
    """The bundled demo checkpoint, so commands work on a fresh machine with no network."""
    try:
        from dsmoe.demo import DEMO_MODEL_PATH
    except ImportError:
        raise DsmoeError("no --model given and the bundled demo model is not installed") from None
    return str(DEMO_MODEL_PATH)


def is_interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()
