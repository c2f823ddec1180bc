"""dsmoe: run DeepSeekMoE language models locally."""

from dsmoe.errors import DsmoeError
from dsmoe.loading import LoadOptions, load

__all__ = ["DsmoeError", "LoadOptions", "load"]
__version__ = "0.1.0"
