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
def _libc() -> ctypes.CDLL | None:
    """libc's madvise and mincore through ctypes, which lets go of the GIL while they run."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name, use_errno=True) if name is not None else None
    if libc is None or not hasattr(libc, "madvise") or not hasattr(libc, "mincore"):
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    libc.mincore.restype = ctypes.c_int
    return libc


def advise(address: int, nbytes: int, advice: int) -> bool:
    """madvise(2) on a page-aligned range, the GIL let go while it runs (``mmap.madvise`` holds it,
    and populating a range from disk can take seconds); False where it failed or libc has none."""
    libc = _libc()
    return libc is not None and libc.madvise(address, nbytes, advice) == 0


def cached(address: int, nbytes: int) -> bool:
    """Whether every page of a mapped, page-aligned range is in the page cache (mincore(2));
    False where that cannot be told."""
    libc = _libc()
    if libc is None:
        return False
    pages = -(-nbytes // mmap.PAGESIZE)
    vector = (ctypes.c_ubyte * pages)()
    return libc.mincore(address, nbytes, vector) == 0 and all(v & 1 for v in vector)


def address_of(buffer: mmap.mmap) -> int:
    """Where a writable mapping starts in memory."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))
