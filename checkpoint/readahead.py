"""Ask the kernel to read a model's files while Python is still importing torch.

A cold start (nothing in the page cache) spends seconds importing torch, whose own libraries come
from the disk too, before the loader reads a byte of the model. Advising the kernel to read the
weight files at start overlaps the two. Only a model that fits well within the memory there is
gets this: a larger one is offloaded and reads what it needs itself, and reading it whole would
only push its own pages out. This module imports nothing heavy (no torch) so that the console
script can call it first.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from dsmoe.checkpoint.free_memory import available_memory

READ_AHEAD_SHARE = 0.5
"""The most of the available memory a read-ahead may fill: the loaded model needs room of its own."""
ADVICE_BYTES = 128 * 2**10
"""One ``POSIX_FADV_WILLNEED`` call's span. Linux reads at most max(read_ahead_kb, max_sectors_kb)
of what one call asks for and drops the rest, silently (64 MiB spans read 8 MiB of each here);
128 KiB is the default read_ahead_kb, so every span is read in full. The files go front to back,
so the first tensors the loader maps are the first to arrive."""


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def is_stored_quantized(folder: Path) -> bool:
    """Whether the folder's config says its weights are stored 4- or 8-bit (read as they are)."""
    try:
        return "quantization_config" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False


def start_read_ahead(folder: Path) -> threading.Thread | None:
    """Start reading ``folder``'s weight files into the page cache on a thread of their own;
    None where nothing is read ahead (no files, no ``posix_fadvise``, or too little memory)."""
    if not hasattr(os, "posix_fadvise"):
        return None
    files = weight_files(folder)
    try:
        total = sum(path.stat().st_size for path in files)
    except OSError:
        return None
    available, _ = available_memory()
    if not files or total > READ_AHEAD_SHARE * available:
        return None
    thread = threading.Thread(target=advise_will_need, args=(files,), name="dsmoe-read-ahead", daemon=True)
    thread.start()
    return thread


def advise_will_need(files: list[Path]) -> None:
    """``POSIX_FADV_WILLNEED`` over each file in turn: the kernel queues the reads and returns."""
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # the loader reports a missing or unreadable file; a hint has nothing to say
        try:
            size = os.fstat(fd).st_size
            for offset in range(0, size, ADVICE_BYTES):
                os.posix_fadvise(fd, offset, min(ADVICE_BYTES, size - offset), os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)
