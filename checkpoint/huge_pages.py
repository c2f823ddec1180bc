"""Transparent huge pages for the weights a stored checkpoint's mapping serves.

A decode step reads every active weight once from memory. In 4 KB pages that is ~135k pages a
token at the 8-layer 16B geometry: a TLB miss and a page walk for each, the hardware prefetchers
stopping at every page's end. A stored checkpoint is mapped (``Checkpoint.map``), and Linux maps
a file's pages as 2 MB pages where the page cache holds them in 2 MB folios: with the cache so,
stored 4-bit decode ran 1.16x faster than with the same files in small folios
(docs/PERFORMANCE.md, "Weights in huge pages"). So what matters is how a file's pages come into
the cache: written in large aligned pieces (``checkpoint.writer``), or faulted in through a
mapping advised ``MADV_HUGEPAGE`` (``readahead``, and the loader's own mapping); neither
``POSIX_FADV_WILLNEED`` nor small writes (``safetensors.torch.save_file``) leave 2 MB folios.

Nothing heavy is imported here: the console script's read-ahead uses it before torch is imported.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
from functools import lru_cache
from pathlib import Path
from typing import Callable

THP_SETTINGS = Path("/sys/kernel/mm/transparent_hugepage")
MADV_DONTNEED, MADV_POPULATE_READ = 4, 22
"""Linux's madvise advice (populating from 5.14 on; Python's mmap module names it from 3.13)."""


@lru_cache(maxsize=1)
def huge_page_bytes() -> int | None:
    """The size of a transparent huge page, or None where Linux gives none to memory that asks
    (no THP in the kernel, THP set to "never", another OS)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    try:
        enabled = (THP_SETTINGS / "enabled").read_text()
        size = int((THP_SETTINGS / "hpage_pmd_size").read_text())
    except (OSError, ValueError):
        return None
    if "[always]" not in enabled and "[madvise]" not in enabled:
        return None
    return size


@lru_cache(maxsize=1)
def _libc_madvise() -> Callable[[int, int, int], int] | None:
    name = ctypes.util.find_library("c")
    advise = getattr(ctypes.CDLL(name, use_errno=True), "madvise", None) if name is not None else None
    if advise is not None:
        advise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        advise.restype = ctypes.c_int
    return advise


def advise(address: int, nbytes: int, advice: int) -> bool:
    """madvise(2) on a page-aligned range, the GIL let go while it runs (``mmap.madvise`` holds it,
    and populating a range from disk can take seconds); False where it failed or libc has none."""
    call = _libc_madvise()
    return call is not None and call(address, nbytes, advice) == 0


def address_of(buffer: mmap.mmap) -> int:
    """Where a writable mapping starts in memory."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))
