"""The console script: start reading the model's files, then import the commands (and torch).

Importing torch takes seconds, and on a cold start its libraries and the model compete for the
disk anyway; the model's reads are queued first so they overlap the imports
(``checkpoint.readahead``). Only a local folder given with ``-m``/``--model`` to a command that
loads it whole is read ahead: an offloaded run reads its experts itself. A float checkpoint run
with ``--bits`` loads its quantized cache entry, which is read ahead in its place when the cache
holds one for those bits (and no flag picks among several formats); with none, the run converts
as it reads.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dsmoe.checkpoint.cache_entries import entry_to_read
from dsmoe.checkpoint.readahead import is_stored_quantized, start_read_ahead

LOADING_COMMANDS = frozenset({"chat", "generate", "bench", "serve", "perplexity", "eval"})
OFFLOAD_FLAGS = ("--max-ram", "--expert-cache", "--gpu-mem", "--offload")
FORMAT_FLAGS = ("--quant-type", "--double-quant", "--lm-head", "--quantize-lm-head", "--no-quantize-lm-head",
                "--no-cache")
"""Flags that choose which cache entry a ``--bits`` run loads (or none): with one, nothing is read ahead."""


def model_to_read_ahead(args: list[str]) -> Path | None:
    """The folder a command line will load whole, or None."""
    words = [a for a in args if a != "--debug"]
    command = next((a for a in words if not a.startswith("-")), None)
    if command not in LOADING_COMMANDS or "--" in words:
        return None
    if any(a == flag or a.startswith(flag + "=") for a in words for flag in OFFLOAD_FLAGS):
        return None
    model = _value(words, "--model") or _value(words, "-m")
    if model is None:
        return None
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return None
    bits = _value(words, "--bits")
    if bits in ("4", "8") and not is_stored_quantized(folder):
        if any(a == flag or a.startswith(flag + "=") for a in words for flag in FORMAT_FLAGS):
            return None
        return entry_to_read(folder, int(bits))
    return folder


def _value(words: list[str], flag: str) -> str | None:
    """The last value given to ``flag`` (``--flag V`` or ``--flag=V``)."""
    value = None
    for i, word in enumerate(words):
        if word == flag and i + 1 < len(words):
            value = words[i + 1]
        elif word.startswith(flag + "="):
            value = word.split("=", 1)[1]
    return value


def main() -> None:
    folder = model_to_read_ahead(sys.argv[1:])
    if folder is not None:
        start_read_ahead(folder)
    from dsmoe.cli.main import main as run

    run()
