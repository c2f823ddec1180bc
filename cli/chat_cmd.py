"""``dsmoe chat``: a multi-turn conversation at the terminal, or plain replies for piped input."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dsmoe.cli.app import app
from dsmoe.cli.common import (
    CtxSizeOption, ModelOption, TemperatureOption, ThreadsOption, console,
    debug_enabled, err_console, guarded, is_interactive, max_new_tokens_option, stdin_lines, stdin_text, use_threads,
)
from dsmoe.cli.loading import load_flags, load_with_progress
from dsmoe.cli.offload_view import (
    plan_table,
)
from dsmoe.loading import LoadOptions
from dsmoe.errors import DsmoeError, UsageError
from dsmoe.model.chat import SETTABLE, ChatSession, Reply, ReplyStats, SessionStats
from dsmoe.model.generate import SamplingSettings
from dsmoe.offload import store_of

if TYPE_CHECKING:
    from prompt_toolkit import PromptSession

HELP = """\
[bold]Commands[/]
  /help                 this list
  /reset                forget the conversation (the system prompt stays)
  /stats                context use, tokens, settings, memory
  /save FILE            write the conversation as a JSON transcript
  /load FILE            continue a saved conversation
  /set NAME VALUE       change a setting: {settings}
  /exit                 leave (Ctrl-D does the same)

[bold]Input[/]
  End a line with \\ to continue the message on the next line.
  Up/Down recall earlier messages; the usual line-editing keys work.
  Ctrl-C while a reply is streaming stops it; the partial reply is kept in the conversation.
  Ctrl-C at the prompt clears the line."""


def _size(n: int) -> str:
    """Bytes in binary units, to one decimal (MiB for a process, KiB for a small cache)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _kv_note(context: int, cached: int) -> str:
    """Why the KV cache and the conversation differ in length, when they do."""
    if cached < context:
        verb = "goes" if context - cached == 1 else "go"
        return f" ({_count(context - cached, 'token')} of the conversation {verb} in with the next message)"
    if cached > context:
        return " (the next message reuses only the part that still matches)"
    return ""


def _hit_rate(rate: float | None) -> str:
    return "cache n/a" if rate is None else f"cache {rate:.0%} hits"


def stats_line(stats: ReplyStats) -> str:
    """The one dim line after a reply: size, latency, speed, expert-cache hits, memory."""
    ttft = "n/a" if stats.time_to_first_token is None else f"{stats.time_to_first_token:.2f} s"
    parts = [
        f"{stats.new_tokens} tokens",
        f"first token {ttft}",
        f"{stats.tokens_per_second:.1f} tokens/s",
        _hit_rate(stats.cache_hit_rate),
        f"RSS {_size(stats.rss_bytes)}",
    ]
    return " · ".join(parts)


def _stats_table(stats: SessionStats) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="dim")
    table.add_column()
    s = stats.settings
    rows = [
        ("turns", str(stats.turns)),
        ("context", f"{stats.context_tokens} / {stats.context_limit} tokens"),
        ("KV cache", f"{_count(stats.cached_tokens, 'token')}, {_size(stats.kv_cache_bytes)}"
                     + _kv_note(stats.context_tokens, stats.cached_tokens)),
        ("generated", f"{_count(stats.generated_tokens, 'token')} in {_count(stats.replies, 'reply', 'replies')}"),
        ("sampling", f"temperature {s.temperature}, top_p {s.top_p}, top_k {s.top_k}, "
                     f"repetition_penalty {s.repetition_penalty}, max_new_tokens {s.max_new_tokens}, "
                     f"seed {'random' if s.seed is None else s.seed}"),
        ("experts", _hit_rate(stats.cache_hit_rate)),
        ("memory", f"RSS {_size(stats.rss_bytes)}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def cut_off_notice(reply: Reply, limit: int) -> str | None:
    """What to say when the reply stopped at its token limit rather than at its end."""
    if reply.stats is None or not reply.stats.cut_off:
        return None
    if reply.stats.new_tokens >= limit:
        return f"[cut off at max_new_tokens = {limit}; /set max_new_tokens N for longer replies]"
    return f"[cut off: the context is full at {reply.stats.prompt_tokens + reply.stats.new_tokens} tokens]"


def _stream(reply: Reply, decorated: bool, limit: int) -> None:
    """Print the reply as it comes; Ctrl-C ends it early and the session goes on."""
    try:
        for piece in reply:
            console.out(piece, end="", highlight=False)
    except KeyboardInterrupt:
        pass
    finally:
        reply.close()
    console.out("")
    cut = cut_off_notice(reply, limit)
    if not decorated:
        if cut:
            err_console.print(cut, markup=False, highlight=False, soft_wrap=True)
        return
    if reply.stats is not None:
        if reply.stats.interrupted:
            console.print("[yellow]interrupted[/] [dim](the partial reply is kept)[/]")
        if cut:
            console.print(f"[yellow]{escape(cut)}[/]", soft_wrap=True)
        console.print(f"[dim]{stats_line(reply.stats)}[/]")


def _dropped_notice(reply: Reply) -> str | None:
    if not reply.dropped_turns:
        return None
    turns = "turn" if reply.dropped_turns == 1 else "turns"
    return f"context nearly full: dropped the {reply.dropped_turns} oldest {turns}"


def _command(session: ChatSession, line: str, out: Console = console) -> bool:
    """Run one slash command, printing to ``out``; False means leave."""
    name, _, rest = line[1:].strip().partition(" ")
    arg = rest.strip()
    if name in ("exit", "quit"):
        return False
    if name == "help":
        out.print(HELP.format(settings=", ".join(SETTABLE)), soft_wrap=True)
    elif name == "reset":
        session.reset()
        out.print("[dim]conversation cleared[/]")
    elif name == "stats":
        out.print(_stats_table(session.stats()))
    elif name in ("save", "load"):
        if not arg:
            raise UsageError(f"/{name} needs a file name")
        if name == "save":
            path = session.save(arg)
            out.print(f"[dim]saved {len(session.messages)} messages to {escape(str(path))}[/]")
        else:
            count = session.load(arg)
            out.print(f"[dim]loaded {count} messages from {escape(str(Path(arg).expanduser()))}[/]")
    elif name == "set":
        key, _, value = arg.partition(" ")
        if not key or not value.strip():
            raise UsageError(f"usage: /set NAME VALUE (NAME: {', '.join(SETTABLE)})")
        session.set(key, value.strip())
        out.print(f"[dim]{escape(key)} = {getattr(session.settings, key)}[/]")
    else:
        raise UsageError(f"unknown command /{name} (/help lists them)")
    return True


def _read_message(prompt: "PromptSession[str]") -> str:
    """One message from the terminal; a line ending in a backslash continues on the next."""
    lines: list[str] = []
    line = prompt.prompt("> ")
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = prompt.prompt("… ")
    lines.append(line)
    return "\n".join(lines)


def _interactive(session: ChatSession, name: str) -> None:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import InMemoryHistory

    prompt: PromptSession[str] = PromptSession(history=InMemoryHistory())
    console.print(f"[dim]chatting with {escape(name)} — /help for commands, Ctrl-D or /exit to leave[/]")
    while True:
        try:
            text = _read_message(prompt)
        except KeyboardInterrupt:
            continue
        except EOFError:
            return
        if not text.strip():
            continue
        try:
            if text.startswith("/"):
                if not _command(session, text):
                    return
                continue
            reply = session.ask(text)
        except DsmoeError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
            continue
        except Exception as exc:  # noqa: BLE001  (a bug, but the conversation is the user's: keep it and say so)
            if debug_enabled():
                err_console.print_exception()
            err_console.print(f"[bold red]error:[/] {escape(type(exc).__name__)}: {escape(str(exc))} "
                              "(a bug in dsmoe; the conversation is kept)", soft_wrap=True)
            continue
        notice = _dropped_notice(reply)
        if notice:
            console.print(f"[yellow]{notice}[/]")
        _stream(reply, decorated=True, limit=session.settings.max_new_tokens)


def _plain(session: ChatSession, messages: Iterable[str], commands: bool = True) -> bool:
    """Piped input: each message gets its reply as bare text; slash commands run as at the
    terminal (their output and every notice on stderr). False when a command failed."""
    ok = True
    for text in messages:
        if not text.strip():
            continue
        if commands and text.startswith("/"):
            try:
                if not _command(session, text, out=err_console):
                    break
            except DsmoeError as exc:
                err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
                ok = False
            continue
        reply = session.ask(text)
        notice = _dropped_notice(reply)
        if notice:
            err_console.print(notice)
        _stream(reply, decorated=False, limit=session.settings.max_new_tokens)
    return ok


@app.command("chat")
@guarded
@load_flags
def chat(
    model: str = ModelOption,
    system: str = typer.Option(None, "--system", "-s", help="A system prompt that opens the conversation."),
    single: bool = typer.Option(False, "--single", help="Piped input: the whole input is one message (default: one per line)."),
    max_new_tokens: int = max_new_tokens_option(512),
    temperature: float = TemperatureOption,
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k likeliest (0: all)."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="> 1 discourages repeats."),
    seed: int = typer.Option(None, "--seed", help="Random seed for sampling."),
    ctx_size: int = CtxSizeOption,
    threads: int = ThreadsOption,
    *,
    load: LoadOptions,
) -> None:
    """Chat with a model: streamed replies, the KV cache kept across turns, /help for commands.

    With input from a pipe, each line is a message (or all of it with --single) and the replies
    are printed as plain text.
    """
    settings = SamplingSettings(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        repetition_penalty=repetition_penalty, seed=seed,
    )
    use_threads(threads)
    loaded, tokenizer = load_with_progress(model, load)
    if tokenizer is None:
        raise UsageError("this checkpoint has no tokenizer.json, so it cannot chat")
    store = store_of(loaded)
    if store is not None and is_interactive():
        err_console.print(plan_table(store.plan))
    session = ChatSession(loaded, tokenizer, settings, system=system, context_limit=ctx_size,
                          cache_stats=(lambda: store.stats.hit_rate()) if store is not None else None)
    if is_interactive():
        _interactive(session, model or "the demo model")
    elif single:
        _plain(session, [stdin_text()], commands=False)
    elif not _plain(session, stdin_lines()):
        raise typer.Exit(1)
