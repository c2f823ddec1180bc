"""What every command shares: the consoles, error display, and the model-loading flags."""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from dsmoe.demo import DEMO_MODEL_PATH
from dsmoe.errors import DsmoeError, UsageError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

# Piped or redirected stdout gets lines as long as they need: a table cut at 80 columns is useless
# to a script or a file (rich's default width off a terminal).
PLAIN_WIDTH = 10_000

_debug = False

F = TypeVar("F", bound=Callable[..., Any])


def set_debug(value: bool) -> None:
    global _debug
    _debug = value


def debug_enabled() -> bool:
    return _debug


def _decoded(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} is not valid UTF-8 text (byte {exc.start})") from None


def stdin_text() -> str:
    """All of standard input as text; bytes that are not UTF-8 are one clear error, not a traceback."""
    return _decoded(sys.stdin.buffer.read(), "standard input")


def stdin_lines() -> Iterator[str]:
    """Standard input line by line (without line ends), each checked to be UTF-8."""
    for number, line in enumerate(sys.stdin.buffer, start=1):
        yield _decoded(line, f"line {number} of standard input").rstrip("\r\n")


def check_utf8_arguments(arguments: list[str]) -> None:
    """Python keeps undecodable argument bytes as lone surrogates; refuse them before any command runs."""
    for argument in arguments:
        try:
            argument.encode("utf-8")
        except UnicodeEncodeError:
            shown = argument.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            raise UsageError(f"argument {shown!r} is not valid UTF-8 text") from None


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (kill, a closing terminal's supervisor) cleans up like Ctrl-C: KeyboardInterrupt."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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

    return wrapper  # type: ignore[return-value]  # functools.wraps keeps F's signature; mypy cannot see it


# The flags shared by the commands that load a model or compute, declared once so they read the same
# (the loading flags are cli.loading's).
ModelOption = typer.Option(None, "--model", "-m", help="Checkpoint folder or Hugging Face repo id (default: the bundled demo model).")
ThreadsOption = typer.Option(None, "--threads", "-t", min=1, help="CPU threads (default: torch's choice).")
CtxSizeOption = typer.Option(None, "--ctx-size", "-c", min=2, help="Context length in tokens (default: the model's max_position_embeddings).")
TemperatureOption = typer.Option(0.0, "--temperature", "--temp", help="0 is greedy.")


def max_new_tokens_option(default: int) -> Any:
    """``-n/--max-new-tokens``: the same flag on every command that generates."""
    return typer.Option(default, "--max-new-tokens", "-n", min=0, help="Most tokens to generate.")


def use_threads(threads: int | None) -> None:
    """Apply ``--threads`` before any computation."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def full_width(table: Table) -> Table:
    """Off a terminal, make the table wide enough for its title and caption on one line each
    (rich wraps them to the table's own width, whatever the console's)."""
    if not console.is_terminal:
        longest = max(len(str(table.title or "")), len(str(table.caption or "")))
        table.min_width = max(table.min_width or 0, longest + 4)
    return table


def human_bytes(n: float) -> str:
    """Bytes in decimal units with three significant digits, so a 7 MB model does not read 0.01 GB."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(value) < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1000
    return f"{value:.3g} TB"


def read_text_file(path: Path) -> str:
    """A UTF-8 text file a flag names, or one clear error."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None


def default_model() -> str:
    """The bundled demo checkpoint, so commands work on a fresh machine with no network."""
    return str(DEMO_MODEL_PATH)


def is_interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


Report = Callable[[int, int], None]

# Off a terminal, work that ends sooner than this prints no progress lines (a small model loads in
# a blink; its log should not fill with percentages).
QUIET_PROGRESS_S = 1.0


@contextlib.contextmanager
def progress_report(label: str, columns: tuple[ProgressColumn, ...] = (), unit: str = "") -> Iterator[Report]:
    """A ``report(done, total)`` callback: a bar on a terminal, else a line at every tenth of the work.

    Off a terminal (a log, CI, a pipe) rich draws nothing, so a long load would look hung.
    """
    if err_console.is_terminal:
        bar = Progress(TextColumn(escape(label)), BarColumn(), *(columns or (MofNCompleteColumn(),)),
                       TimeElapsedColumn(), console=err_console, transient=True)
        with bar:
            task = bar.add_task(label, total=None)
            yield lambda done, total: bar.update(task, completed=done, total=total)
        return
    started: float | None = None  # from the first report: what comes before it is not this work
    shown = -1

    def report(done: int, total: int) -> None:
        nonlocal shown, started
        started = started or time.perf_counter()
        tenth = 10 * done // total if total else 0
        if tenth > shown and time.perf_counter() - started >= QUIET_PROGRESS_S:
            shown = tenth
            amount = f"{human_bytes(done)} of {human_bytes(total)}" if unit == "bytes" else f"{done}/{total}{unit}"
            err_console.print(f"{label}: {10 * tenth}% ({amount}, {time.perf_counter() - started:.1f} s)",
                              markup=False, highlight=False, soft_wrap=True)

    yield report
