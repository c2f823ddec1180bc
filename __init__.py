"""dsmoe: run DeepSeekMoE language models locally.

``load`` and ``LoadOptions`` are imported on first use: they bring in torch, which takes seconds,
and the console script reads ahead a model's files before that (``checkpoint.readahead``).
"""

from typing import TYPE_CHECKING, Any

from dsmoe.errors import DsmoeError

if TYPE_CHECKING:
    from dsmoe.loading import LoadOptions, load

__all__ = ["DsmoeError", "LoadOptions", "load"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("LoadOptions", "load"):
        from dsmoe import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'dsmoe' has no attribute {name!r}")
