"""``dsmoe serve``: the model behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import logging
import sys

import typer
from rich.markup import escape

from dsmoe.cli.app import app
from dsmoe.cli.common import (
    ModelOption, ThreadsOption, console, err_console, guarded, use_threads,
)
from dsmoe.cli.loading import load_flags, load_with_progress
from dsmoe.cli.offload_view import (
    plan_table,
)
from dsmoe.loading import LoadOptions
from dsmoe.errors import UsageError
from dsmoe.offload import store_of


@app.command("serve")
@guarded
@load_flags
def serve_command(
    model: str = ModelOption,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; anything but loopback needs --api-key."),
    port: int = typer.Option(8000, "--port", help="TCP port (0: any free one)."),
    api_key: str = typer.Option(None, "--api-key", envvar="DSMOE_API_KEY",
                                help="Require 'Authorization: Bearer KEY' (also read from $DSMOE_API_KEY)."),
    insecure_no_key: bool = typer.Option(False, "--insecure-no-key", help="Serve a non-loopback address without a key."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests that may wait behind the running one; more get 429."),
    ctx_size: int = typer.Option(None, "--ctx-size", "--ctx", help="Most tokens of prompt + reply (default: the model's positions)."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", "-n", help="Token limit of a request that sets no max_tokens."),
    threads: int = ThreadsOption,
    *,
    load: LoadOptions,
) -> None:
    """Serve a model over HTTP: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics.

    Requests are answered one at a time in the order they came; Ctrl-C or SIGTERM stops the server.
    """
    from dsmoe.serve import Server, check_exposure
    from dsmoe.serve.server import is_loopback

    check_exposure(host, api_key, insecure_no_key)
    for flag, value, least in (("--max-queue", max_queue, 0), ("--max-new-tokens", max_new_tokens, 0),
                               ("--ctx-size", ctx_size, 2)):
        if value is not None and value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}")
    use_threads(threads)
    loaded, tokenizer = load_with_progress(model, load)
    if tokenizer is None:
        raise UsageError("this checkpoint has no tokenizer.json, so it cannot be served")
    store = store_of(loaded)
    if store is not None:
        err_console.print(plan_table(store.plan))
    _log_to_stderr()
    name = model or "dsmoe-demo"
    if api_key is None and not is_loopback(host):
        err_console.print(f"[yellow]warning:[/] serving {escape(host)} without an API key (--insecure-no-key)")

    def listening(bound_host: str, bound_port: int) -> None:
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        auth = ", API key required" if api_key else ""
        console.print(f"serving {escape(name)} at http://{shown}:{bound_port}/v1{auth} (Ctrl-C to stop)",
                      soft_wrap=True, highlight=False)

    server = Server(loaded, tokenizer, model_name=name, host=host, port=port, api_key=api_key, max_queue=max_queue,
                    context=ctx_size, default_max_tokens=max_new_tokens, store=store, on_listening=listening)
    server.run()
    err_console.print("[dim]server stopped[/]")


def _log_to_stderr() -> None:
    """One line per request from ``dsmoe.serve``; uvicorn says only what goes wrong."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    for name, level in (("dsmoe.serve", logging.INFO), ("uvicorn", logging.WARNING), ("uvicorn.error", logging.WARNING)):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.handlers = [handler]
        logger.propagate = False
