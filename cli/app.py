"""The Typer application that every command module registers itself on."""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup


def _bare_flags(params: list[Any]) -> list[Any]:
    """A flag takes no value, so its help shows no ``<bool>`` type (an empty metavar hides it)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _bare_flags(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _bare_flags(super().get_params(ctx))


class _App(typer.Typer):
    def command(self, *args: Any, cls: type[TyperCommand] = _Command, **kwargs: Any) -> Any:  # type: ignore[override]  # typer's command(), with our Command class as default
        return super().command(*args, cls=cls, **kwargs)


app = _App(
    name="dsmoe",
    cls=_Group,
    help="Run DeepSeekMoE language models locally: chat, generate, quantize, evaluate, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
