"""How fast the disk under a checkpoint reads: the figure ``dsmoe info --plan`` predicts with.

The probe reads the checkpoint's own shards the way the disk tier does, in 4 MiB requests with
O_DIRECT, so the page cache (warm from an earlier load) does not pass for the disk. Where the
filesystem refuses O_DIRECT (tmpfs answers EINVAL) it reads buffered after asking the kernel to
drop the file's cached pages, which is the closest a buffered read gets to the device.
"""

from __future__ import annotations

import errno
import mmap
import os
import time
from pathlib import Path

CHUNK = 4 * 2**20
PROBE_BYTES = 256 * 2**20
PROBE_SECONDS = 1.0


def disk_bandwidth(files: list[Path], limit: int = PROBE_BYTES, seconds: float = PROBE_SECONDS) -> float:
    """Bytes/s reading ``files`` from their start, up to ``limit`` bytes or about ``seconds``."""
    buffer = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT wants
    total, started = 0, time.perf_counter()
    try:
        for path in files:
            total += _read(path, buffer, limit - total, started + seconds)
            if total >= limit or time.perf_counter() >= started + seconds:
                break
    finally:
        buffer.close()
    elapsed = time.perf_counter() - started
    if total == 0:
        raise OSError(errno.ENODATA, "nothing to read for the disk probe", str(files[0]) if files else "")
    return total / elapsed


def _read(path: Path, buffer: mmap.mmap, limit: int, deadline: float) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return _read_buffered(path, buffer, limit, deadline)
    try:
        return _loop(fd, buffer, limit, deadline)
    except OSError as exc:  # some filesystems open with O_DIRECT and refuse the read
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)
    return _read_buffered(path, buffer, limit, deadline)


def _read_buffered(path: Path, buffer: mmap.mmap, limit: int, deadline: float) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return _loop(fd, buffer, limit, deadline)
    finally:
        os.close(fd)


def _loop(fd: int, buffer: mmap.mmap, limit: int, deadline: float) -> int:
    done = 0
    while done < limit and time.perf_counter() < deadline:
        n = os.preadv(fd, [buffer], done)
        done += n
        if n < CHUNK:  # the end of the file (O_DIRECT could not read on from an unaligned offset)
            break
    return done
