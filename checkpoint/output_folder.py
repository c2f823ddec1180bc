"""Writing a checkpoint folder so that it appears complete or not at all, and never over someone else's.

A folder is built as ``DST.partial-PID`` beside DST and renamed into place at the end. The rename
refuses to land on anything that appeared at DST meanwhile (``renameat2(RENAME_NOREPLACE)`` on
Linux), and a ``--force`` replacement removes only a folder that was checked to be a checkpoint
or empty. A ``DST.partial-PID`` whose process is gone (a kill -9) is found and removed by the next
run, which names it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from dsmoe.errors import UsageError

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _libc_renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_renameat2 = _libc_renameat2()


def rename_no_replace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; FileExistsError when anything (even an empty folder) is at ``dst``."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise FileExistsError(code, os.strerror(code), str(dst))
        if code not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: this file system has no RENAME_NOREPLACE
            raise OSError(code, os.strerror(code), str(dst))
    # Without renameat2 a folder appearing in this instant is the one case not caught.
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def is_replaceable(folder: Path) -> bool:
    """What ``--force`` may delete: a checkpoint (it holds a config.json) or an empty folder."""
    try:
        return folder.is_dir() and not folder.is_symlink() and (
            (folder / "config.json").is_file() or not any(folder.iterdir()))
    except OSError:
        return False


def check_destination(dst: Path, force: bool) -> None:
    """Refuse a DST that exists (unless ``force`` and it is a checkpoint or empty) or is not a folder."""
    if not os.path.lexists(dst):
        return
    if not force:
        raise UsageError(f"{dst}: already exists (use --force to replace it)")
    if not dst.is_dir() or dst.is_symlink():
        raise UsageError(f"{dst}: exists and is not a folder")
    if not is_replaceable(dst):
        raise UsageError(f"{dst}: --force replaces only a checkpoint (a folder with config.json) or an empty "
                         "folder; this one holds other files, so move or delete it yourself")


@dataclass
class StalePartials:
    removed: list[Path] = field(default_factory=list)
    """``DST.partial-PID`` folders whose process was gone: removed."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clear_stale_partials(dst: Path) -> StalePartials:
    """Remove what killed runs left beside DST; refuse when a live process is still writing one."""
    found = StalePartials()
    prefix = f"{dst.name}.partial-"
    try:
        entries = list(dst.parent.iterdir()) if dst.parent.is_dir() else []
    except OSError:
        entries = []
    for entry in sorted(entries):
        suffix = entry.name[len(prefix):] if entry.name.startswith(prefix) else ""
        if not suffix.isdigit():
            continue
        pid = int(suffix)
        if pid == os.getpid():
            shutil.rmtree(entry, ignore_errors=True)
        elif _alive(pid):
            raise UsageError(f"{entry}: being written by process {pid} (another conversion to {dst}?); "
                             "wait for it to finish, or delete the folder if that process is not dsmoe")
        else:
            shutil.rmtree(entry, ignore_errors=True)
            found.removed.append(entry)
    return found


def move_into_place(work: Path, dst: Path, replace: bool) -> None:
    """Rename the finished ``work`` folder to DST; with ``replace``, the old DST goes only if it still
    is a checkpoint or empty, and only after the new one is in place."""
    if not replace or not os.path.lexists(dst):
        _rename_or_refuse(work, dst)
        return
    if not is_replaceable(dst):
        raise UsageError(f"{dst}: changed while converting and is no longer a checkpoint or empty; left as it is")
    old = dst.with_name(f"{dst.name}.replaced-{os.getpid()}")
    os.rename(dst, old)
    try:
        _rename_or_refuse(work, dst)
    except BaseException:
        if not os.path.lexists(dst):
            os.rename(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _rename_or_refuse(work: Path, dst: Path) -> None:
    try:
        rename_no_replace(work, dst)
    except FileExistsError:
        raise UsageError(f"{dst}: appeared while converting; left as it is and the conversion discarded "
                         "(run again with another output folder, or --force onto a checkpoint)") from None
