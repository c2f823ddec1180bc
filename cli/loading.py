"""Loading a model from the CLI with a progress bar on stderr."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dsmoe.cli.common import default_model, err_console
from dsmoe.model.deepseek import DeepseekForCausalLM
from dsmoe.model.loader import load
from dsmoe.model.tokenizer import Tokenizer


def load_with_progress(
    model: str | None, dtype: str, bits: int | None, quant_type: str | None
) -> tuple[DeepseekForCausalLM, Tokenizer | None]:
    path = model or default_model()
    with Progress(
        TextColumn("loading {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err_console, transient=True,
    ) as progress:
        task = progress.add_task(path, total=None)

        def report(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        return load(path, dtype=dtype, bits=bits, quant_type=quant_type, progress=report)
