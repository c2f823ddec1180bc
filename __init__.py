"""dsmoe: run DeepSeekMoE language models locally."""

from dsmoe.errors import DsmoeError
from dsmoe.model.loader import load

__all__ = ["DsmoeError", "load"]
__version__ = "0.1.0"
