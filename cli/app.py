"""The Typer application that every command module registers itself on."""

import typer

app = typer.Typer(
    name="dsmoe",
    help="Run DeepSeekMoE language models locally: chat, generate, quantize, evaluate, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
