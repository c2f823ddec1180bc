"""The loading flags every model-loading command takes, and loading with progress on stderr.

The flags are declared once here; ``load_flags`` gives a command all of them and hands it one
``LoadOptions``, so each command reads them the same and a bad value fails with the same line.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import typer

from dsmoe.cli.common import default_model, err_console, progress_report
from dsmoe.loading import LoadOptions, load
from dsmoe.model.deepseek import DeepseekForCausalLM
from dsmoe.model.tokenizer import Tokenizer
from dsmoe.offload import store_of
from dsmoe.quant.cache import CacheOutcome

PANEL = "Loading and offloading"

# name -> (type, option): LoadOptions' fields, as flags.
LOAD_FLAGS: dict[str, tuple[Any, Any]] = {  # (annotation, typer option)
    "dtype": (str, typer.Option("bf16", "--dtype", help="Compute dtype: bf16, fp16 or fp32.", rich_help_panel=PANEL)),
    "bits": (int, typer.Option(None, "--bits", help="Quantize while loading: 4 or 8 (16 = no quantization).",
                               rich_help_panel=PANEL)),
    "quant_type": (str, typer.Option(None, "--quant-type", help="4-bit format: nf4 (default) or fp4.", rich_help_panel=PANEL)),
    "double_quant": (bool, typer.Option(False, "--double-quant", help="With --bits 4: quantize the absmax scales too.",
                                        rich_help_panel=PANEL)),
    "quantize_lm_head": (Optional[bool], typer.Option(None, "--quantize-lm-head/--no-quantize-lm-head",
                                                      help="Quantize lm_head (default: in every 4- or 8-bit run).",
                                                      rich_help_panel=PANEL)),
    "lm_head": (str, typer.Option(None, "--lm-head", help="lm_head's format: q6 (dsmoe's 6-bit; the default with "
                                  "--bits 4) or int8 (the default with --bits 8).", rich_help_panel=PANEL)),
    "expert_cache": (int, typer.Option(None, "--expert-cache", help="Expert slots per MoE layer on the compute device.",
                                       rich_help_panel=PANEL)),
    "gpu_mem": (float, typer.Option(None, "--gpu-mem", help="GB of GPU memory for the model; experts that do not fit stay in RAM.",
                                    rich_help_panel=PANEL)),
    "max_ram": (float, typer.Option(None, "--max-ram", help="GB of RAM the process may use; below the model's size experts stay on disk.",
                                    rich_help_panel=PANEL)),
    "policy": (str, typer.Option("lru", "--policy", help="Expert cache eviction: lru or lfu.", rich_help_panel=PANEL)),
    "prefetch": (bool, typer.Option(True, "--prefetch/--no-prefetch", help="Guess the next layer's experts and load them early.",
                                    rich_help_panel=PANEL)),
    "no_cache": (bool, typer.Option(False, "--no-cache", help="With --bits: quantize every time, without the "
                                    "quantized-checkpoint cache (~/.cache/dsmoe/quantized).", rich_help_panel=PANEL)),
}

F = TypeVar("F", bound=Callable[..., Any])


def load_flags(command: F) -> F:
    """Give ``command`` every loading flag; it receives them as ``load: LoadOptions``, already checked."""
    signature = inspect.signature(command)
    kept = [p for name, p in signature.parameters.items() if name != "load"]
    # A command's own flag of the same name (eval's --no-cache, for its answers) serves both.
    shared = {name for name in LOAD_FLAGS if name in signature.parameters}
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
             for name, (kind, option) in LOAD_FLAGS.items() if name not in shared]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        flags = {name: kwargs[name] if name in shared else kwargs.pop(name) for name in LOAD_FLAGS}
        return command(*args, load=LoadOptions(**flags), **kwargs)

    wrapper.__signature__ = signature.replace(parameters=[*kept, *added])  # type: ignore[attr-defined]  # what typer reads
    wrapper.__annotations__ = {**{name: kind for name, (kind, _) in LOAD_FLAGS.items()}, **command.__annotations__}
    del wrapper.__annotations__["load"]
    return wrapper  # type: ignore[return-value]  # the same command, its flags swapped for typer


def load_with_progress(model: str | None, options: LoadOptions) -> tuple[DeepseekForCausalLM, Tokenizer | None]:
    """Load with progress; with an expert budget the routed experts go to an expert store (``store_of``)."""
    path = model or default_model()
    action = f"loading {path}" + (f" and quantizing to {options.bits}-bit" if options.bits in (4, 8) else "")
    with progress_report(action, unit=" tensors") as report:
        loaded, tokenizer = load(path, options, progress=report)
    for line in load_lines(loaded):
        err_console.print(line, markup=False)
    return loaded, tokenizer


def load_lines(model: DeepseekForCausalLM) -> list[str]:
    """What the load decided on its own: the quantized-checkpoint cache, and a plan fitted to RAM."""
    store = store_of(model)
    lines = [cache_line(model.quant_cache), store.plan.fitted if store is not None else None]
    return [line for line in lines if line is not None]


def cache_line(outcome: CacheOutcome | None) -> str | None:
    """The one line saying what the load did with the quantized-checkpoint cache."""
    if outcome is None:
        return None
    where = str(outcome.path).replace(str(Path.home()), "~", 1)
    if outcome.action == "written":
        again = "replaced a damaged copy; " if outcome.replaced else ""
        return f"quantized once into {where}; {again}later starts load it directly (--no-cache: not this way)"
    if outcome.action == "read":
        return f"loaded the quantized copy in {where} (--no-cache quantizes again)"
    return f"the quantized copy was not cached: {outcome.reason}"
