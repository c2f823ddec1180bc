"""How fast the disk under a checkpoint reads: the figure ``dsmoe info --plan`` predicts with.

The probe reads the checkpoint's own shards the way the disk tier does, in 4 MiB requests with
O_DIRECT, ``READ_WORKERS`` in flight, so the page cache (warm from an earlier load) does not pass
for the disk. Where the filesystem refuses O_DIRECT (tmpfs answers EINVAL) it reads buffered
after asking the kernel to drop the file's cached pages, the closest a buffered read gets to the
device.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dsmoe.offload.schedule import READ_WORKERS

CHUNK = 4 * 2**20
PROBE_BYTES = 256 * 2**20
PROBE_SECONDS = 1.0


def disk_bandwidth(files: list[Path], limit: int = PROBE_BYTES, seconds: float = PROBE_SECONDS,
                   in_flight: int = READ_WORKERS) -> float:
    """Bytes/s reading ``files`` from their start in ``CHUNK`` requests, ``in_flight`` of them at once
    as the disk tier reads (one request at a time read this machine's disk at 0.4-0.5 GB/s, four at
    0.6-0.85), up to ``limit`` bytes or about ``seconds``."""
    chunks: list[tuple[Path, int]] = []
    for path in files:
        chunks += [(path, offset) for offset in range(0, path.stat().st_size, CHUNK)]
        if len(chunks) * CHUNK >= limit:
            break
    chunks = chunks[: max(1, limit // CHUNK)]
    # One page-aligned buffer (as O_DIRECT wants) per read in flight, made before the clock starts:
    # a fresh 4 MiB mapping per request would fault in 1024 pages inside every timed read.
    buffers: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
    made = [mmap.mmap(-1, CHUNK) for _ in range(in_flight)]
    for buffer in made:
        buffer.write(bytes(CHUNK))  # touch every page now
        buffers.put(buffer)
    started = time.perf_counter()
    deadline = started + seconds
    try:
        with ThreadPoolExecutor(in_flight, thread_name_prefix="dsmoe-disk-probe") as pool:
            total = sum(pool.map(lambda chunk: _read_chunk(chunk[0], chunk[1], deadline, buffers), chunks))
    finally:
        for buffer in made:
            buffer.close()
    elapsed = time.perf_counter() - started
    if total == 0:
        raise OSError(errno.ENODATA, "nothing to read for the disk probe", str(files[0]) if files else "")
    return total / elapsed


def _read_chunk(path: Path, offset: int, deadline: float, buffers: queue.SimpleQueue[mmap.mmap]) -> int:
    """One request into a free buffer: O_DIRECT, or buffered from dropped pages where the filesystem
    refuses it."""
    if time.perf_counter() >= deadline:
        return 0
    buffer = buffers.get()
    try:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            return _read_buffered(path, buffer, offset)
        try:
            return os.preadv(fd, [buffer], offset)
        except OSError as exc:  # some filesystems open with O_DIRECT and refuse the read
            if exc.errno != errno.EINVAL:
                raise
        finally:
            os.close(fd)
        return _read_buffered(path, buffer, offset)
    finally:
        buffers.put(buffer)


def _read_buffered(path: Path, buffer: mmap.mmap, offset: int) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, offset, CHUNK, os.POSIX_FADV_DONTNEED)
        return os.preadv(fd, [buffer], offset)
    finally:
        os.close(fd)
