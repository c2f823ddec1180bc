"""Loading a model from the CLI with a progress bar on stderr."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dsmoe.cli.common import default_model, err_console
from dsmoe.model.deepseek import DeepseekForCausalLM
from dsmoe.model.loader import load
from dsmoe.model.tokenizer import Tokenizer
from dsmoe.offload import OffloadOptions, load_offloaded


def load_with_progress(
    model: str | None, dtype: str, bits: int | None, quant_type: str | None, offload: OffloadOptions | None = None,
) -> tuple[DeepseekForCausalLM, Tokenizer | None]:
    """Load with a progress bar; with ``offload`` the routed experts go to an expert store (``store_of``)."""
    path = model or default_model()
    with Progress(
        TextColumn("loading {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err_console, transient=True,
    ) as progress:
        task = progress.add_task(path, total=None)

        def report(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        if offload is not None:
            loaded, tokenizer, _ = load_offloaded(path, offload, dtype=dtype, bits=bits, quant_type=quant_type,
                                                  progress=report)
            return loaded, tokenizer
        return load(path, dtype=dtype, bits=bits, quant_type=quant_type, progress=report)
