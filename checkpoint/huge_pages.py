"""Transparent huge pages for the weights every token streams.

A decode step reads every active weight once from memory. In 4 KB pages that is ~135k pages a
token at the 8-layer 16B geometry: a TLB miss and a page walk for each, the hardware prefetchers
stopping at every page's end, the pages scattered over the machine's memory. In 2 MB pages the
same decode ran 1.15x faster (docs/PERFORMANCE.md, "Weights in huge pages"). Linux gives them to
two kinds of memory: anonymous private memory advised ``MADV_HUGEPAGE``, and a file's pages in
the page cache where the cache holds them in 2 MB folios and the mapping is advised so too. A
stored checkpoint is mapped (``Checkpoint.map``), so what matters is how its pages came into the
cache: written in large aligned pieces (``checkpoint.writer``) or faulted in through such a
mapping (``readahead``), not by ``POSIX_FADV_WILLNEED`` or small writes, which leave small folios.
Weights made in the process (quantized while loading, or read) go into a ``HugePageArena``.

Nothing heavy is imported here: the console script's read-ahead uses it before torch is imported.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import threading
from functools import lru_cache
from pathlib import Path
from typing import Callable

THP_SETTINGS = Path("/sys/kernel/mm/transparent_hugepage")
CHUNK_BYTES = 32 * 2**20
"""Bytes of one arena chunk: 16 huge pages. A block that does not fit in what is left of a chunk
starts the next (a larger one gets a chunk of its own), so at most one block is left unused at a
chunk's end; pages never written take no memory."""
ALIGNMENT = 64
"""Where each block starts: PyTorch's CPU allocator aligns to 64 bytes, and its kernels may
assume it."""
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
    and populating a range can take seconds); False where it failed or libc has none."""
    call = _libc_madvise()
    return call is not None and call(address, nbytes, advice) == 0


def address_of(buffer: mmap.mmap) -> int:
    """Where a writable mapping starts in memory."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


class HugePageArena:
    """Blocks of huge-page memory, allocated one after another in chunks of ``chunk_bytes``.

    Each chunk is an anonymous private mapping advised ``MADV_HUGEPAGE``, used from its first
    huge-page boundary on (the kernel maps a huge page only where one fits aligned). A block keeps
    its chunk alive (hand out views of the chunk); the arena frees nothing itself. Blocks may be
    taken from several threads.
    """

    def __init__(self, page_bytes: int, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.page_bytes = page_bytes
        self.chunk_bytes = chunk_bytes
        self._chunk: mmap.mmap | None = None
        self._used = self._end = 0  # offsets into the current chunk
        self._spans: list[tuple[int, int]] = []  # every chunk's [start, end) addresses
        self._lock = threading.Lock()

    def allocate(self, nbytes: int) -> tuple[mmap.mmap, int]:
        """A block of ``nbytes``: the chunk holding it and its offset there."""
        with self._lock:
            start = -(-self._used // ALIGNMENT) * ALIGNMENT
            if self._chunk is None or start + nbytes > self._end:
                self._new_chunk(max(nbytes, self.chunk_bytes))
                start = self._used
            assert self._chunk is not None
            self._used = start + nbytes
            return self._chunk, start

    def _new_chunk(self, usable: int) -> None:
        usable = -(-usable // self.page_bytes) * self.page_bytes
        chunk = mmap.mmap(-1, usable + self.page_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        chunk.madvise(mmap.MADV_HUGEPAGE)
        first = (-address_of(chunk)) % self.page_bytes
        self._chunk, self._used, self._end = chunk, first, first + usable
        self._spans.append((address_of(chunk), address_of(chunk) + len(chunk)))

    def holds(self, address: int) -> bool:
        """Whether ``address`` lies in one of the arena's chunks."""
        return any(start <= address < end for start, end in self._spans)


def new_arena() -> HugePageArena | None:
    """An arena where this system gives huge pages to memory that asks for them, else None."""
    page = huge_page_bytes()
    return HugePageArena(page) if page is not None else None
