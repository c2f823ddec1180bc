"""Read a model's files into the page cache while Python is still importing torch.

A cold start (nothing in the page cache) spends seconds importing torch, whose own libraries come
from the disk too, before the loader reads a byte of the model. Reading the weight files at start
overlaps the two. How they are read decides how the cache holds them, and so whether the
loader's mapping can map them in huge pages (``checkpoint.huge_pages``): faulted in through a
mapping advised ``MADV_HUGEPAGE``, they come in 2 MB folios; ``POSIX_FADV_WILLNEED``, used where
huge pages are not offered, reads them into small ones. Only a model that fits well within the
memory there is gets this: a larger one is offloaded and reads what it needs itself, and reading
it whole would only push its own pages out. This module imports nothing heavy (no torch) so that the console
script can call it first.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import threading
from pathlib import Path

from dsmoe.checkpoint.free_memory import available_memory
from dsmoe.checkpoint.huge_pages import (MADV_DONTNEED, MADV_POPULATE_READ, address_of, advise, cached,
                                         huge_page_bytes)
from dsmoe.checkpoint.lazy import mapped_lazily
from dsmoe.checkpoint.safetensors_header import TensorInfo, read_safetensors_header
from dsmoe.errors import CheckpointError

READ_AHEAD_SHARE = 0.5
"""The most of the available memory a read-ahead may fill: the loaded model needs room of its own."""
ADVICE_BYTES = 128 * 2**10
"""The smallest ``POSIX_FADV_WILLNEED`` span. Linux reads at most max(read_ahead_kb, max_sectors_kb)
of what one call asks for and drops the rest, silently (64 MiB spans read 8 MiB of each here), so
each call asks for the device's own figure (``advice_span``); 128 KiB, the default read_ahead_kb,
where sysfs does not say. Not smaller than needed: each return from a call waits for the GIL,
which the main thread holds while it imports torch (the three variants measured alike at 28
layers, docs/PERFORMANCE.md, but fewer waits cannot hurt)."""


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
    thread = threading.Thread(target=read_into_cache, args=(files, is_stored_quantized(folder)),
                              name="dsmoe-read-ahead", daemon=True)
    thread.start()
    return thread


def load_order(files: list[Path], stored_quantized: bool = False) -> list[tuple[Path, int, int]]:
    """Each file's tensors as (file, start, end) byte ranges, in the order the loader reads them:
    by name with layer numbers compared as numbers (the files sort ``layers.10`` before ``layers.2``,
    and a loader waiting on layer 2 while the disk reads layer 19 overlaps nothing). Of a stored
    quantized checkpoint, not the tensors a load maps without reading (``lazy.mapped_lazily``). A
    file whose header cannot be read is one range, whole."""
    headers: dict[Path, dict[str, TensorInfo]] = {}
    ranges: list[tuple[list[str | int], Path, int, int]] = []
    for path in files:
        try:
            headers[path] = read_safetensors_header(path)
        except CheckpointError:  # the loader reports it; read the file whole meanwhile
            try:
                ranges.append(([], path, 0, path.stat().st_size))
            except OSError:
                pass
            continue
    unread = mapped_lazily([name for tensors in headers.values() for name in tensors]) if stored_quantized else set()
    ranges += [(_natural(name), path, info.offset, info.offset + info.nbytes)
               for path, tensors in headers.items() for name, info in tensors.items() if name not in unread]
    ranges.sort(key=lambda item: item[0])
    return [(path, start, end) for _, path, start, end in ranges]


def advice_span(path: Path, root: Path = Path("/")) -> int:
    """The most one ``WILLNEED`` call on ``path`` reads: its block device's larger of read_ahead_kb
    and max_sectors_kb (a partition's are its disk's). ``root`` is "/" except in tests."""
    try:
        device = os.stat(path).st_dev
        block = (root / f"sys/dev/block/{os.major(device)}:{os.minor(device)}").resolve()
        queue = block / "queue" if (block / "queue").is_dir() else block.parent / "queue"
        kib = max(int((queue / name).read_text()) for name in ("read_ahead_kb", "max_sectors_kb"))
    except (OSError, ValueError):
        return ADVICE_BYTES
    return max(ADVICE_BYTES, kib * 2**10)


def _natural(name: str) -> list[str | int]:
    """``model.layers.10.x`` -> ["model.layers.", 10, ".x"]: numbers compare as numbers."""
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", name))]


def read_into_cache(files: list[Path], stored_quantized: bool = False) -> None:
    """Each file's tensors into the page cache, in the loader's order (``huge_page_runs``). A
    stored quantized checkpoint, whose weights the loader maps, where huge pages are offered:
    what is not cached yet is faulted in through a mapping of the file advised ``MADV_HUGEPAGE``
    (``MADV_POPULATE_READ``) and unmapped again (``MADV_DONTNEED``), so this process holds none of
    it; the ext4 shards of an 8-layer 4-bit model, 3 GB, were then mapped in 2 MB pages all but 1%,
    after ``WILLNEED`` not at all (0 of 1 GB), in the same 1.7 s. Cached runs are left alone
    (mapping them again would only cost page-table work), and a float checkpoint, which the
    loader reads, is advised ``POSIX_FADV_WILLNEED`` as before."""
    page = huge_page_bytes()
    if page is None or not stored_quantized:
        advise_will_need(files, stored_quantized)
        return
    maps: dict[Path, mmap.mmap] = {}
    try:
        for path, start, end in huge_page_runs(load_order(files, stored_quantized), page):
            mapping = maps.get(path)
            if mapping is None:
                try:
                    with open(path, "rb") as handle:
                        mapping = maps[path] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
                except (OSError, ValueError):
                    continue  # the loader reports a missing or unreadable file; an empty one has nothing to read
                mapping.madvise(mmap.MADV_HUGEPAGE)
            end, base = min(end, len(mapping)), address_of(mapping)
            if cached(base + start, end - start):
                continue
            if advise(base + start, end - start, MADV_POPULATE_READ):
                advise(base + start, end - start, MADV_DONTNEED)
            else:  # a kernel before 5.14
                mapping.madvise(mmap.MADV_WILLNEED, start, end - start)
    finally:
        for mapping in maps.values():
            mapping.close()


def huge_page_runs(ranges: list[tuple[Path, int, int]], page: int) -> list[tuple[Path, int, int]]:
    """The huge pages of a file that ``ranges`` (in order) touch, each once, in runs of adjacent
    pages: the fewer calls the better, since each return waits for the GIL that the main thread
    holds while it imports torch (an 8-layer model's 5,626 tensors make 406 runs)."""
    runs: list[tuple[Path, int, int]] = []
    seen: set[tuple[Path, int]] = set()
    for path, start, end in ranges:
        for first in range(start // page * page, end, page):
            if (path, first) in seen:
                continue
            seen.add((path, first))
            if runs and runs[-1][0] == path and runs[-1][2] == first:
                runs[-1] = (path, runs[-1][1], first + page)
            else:
                runs.append((path, first, first + page))
    return runs


def advise_will_need(files: list[Path], stored_quantized: bool = False) -> None:
    """``POSIX_FADV_WILLNEED`` over each tensor in the loader's order (``load_order``): the kernel
    queues the reads and returns (``read_into_cache`` where huge pages are not offered)."""
    handles: dict[Path, int] = {}
    spans: dict[Path, int] = {}
    try:
        for path, start, end in load_order(files, stored_quantized):
            fd = handles.get(path)
            if fd is None:
                try:
                    fd = handles[path] = os.open(path, os.O_RDONLY)
                except OSError:
                    continue  # the loader reports a missing or unreadable file; a hint has nothing to say
                spans[path] = advice_span(path)
            for offset in range(start, end, spans[path]):
                os.posix_fadvise(fd, offset, min(spans[path], end - offset), os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        for fd in handles.values():
            os.close(fd)
