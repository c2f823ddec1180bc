"""How much memory this process may still take: the kernel's MemAvailable and the memory cgroup's room.

torch-free, so that the console script can ask before it imports torch (``checkpoint.readahead``).
"""

from __future__ import annotations

from pathlib import Path

import psutil

# A cgroup limit at or above this reads as "no limit" (v1 writes 2**63 rounded down to a page).
UNLIMITED = 2**60


def available_memory() -> tuple[int, str]:
    """Bytes free to take and which reading that is: MemAvailable, or the memory cgroup's room when less."""
    available, source = psutil.virtual_memory().available, "MemAvailable"
    room = cgroup_room()
    if room is not None and room < available:
        available, source = room, "memory cgroup limit"
    return available, source


def cgroup_room(root: Path = Path("/")) -> int | None:
    """Bytes the memory cgroup this process is in still lets it take; None where no cgroup limits it.

    MemAvailable is the machine's figure: inside a cgroup (a container, a capped shell) the cap
    is what the OOM killer enforces, so the plan must see it. Every limited level from the
    process's cgroup up to the root counts (a parent's cap binds its children); the room at a
    level is limit - (usage - reclaimable file pages). A cgroup's usage counts the page cache its
    processes filled, which the kernel drops before it kills anyone, so a warm cache (the
    checkpoint just read) must not read as memory gone. ``root`` is "/" except in tests.
    """
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one hierarchy for every controller
            for mount in (root / "sys/fs/cgroup", root / "sys/fs/cgroup/unified"):
                rooms += _levels(mount, path, "memory.max", "memory.current", ("active_file", "inactive_file"), "file")
        elif "memory" in controllers.split(","):
            rooms += _levels(root / "sys/fs/cgroup/memory", path, "memory.limit_in_bytes", "memory.usage_in_bytes",
                             ("total_active_file", "total_inactive_file"), "total_cache")
    return max(0, min(rooms)) if rooms else None


def _levels(mount: Path, path: str, limit_file: str, usage_file: str, file_pages: tuple[str, str],
            cache_key: str) -> list[int]:
    """The room at each limited level of one hierarchy, from the process's cgroup up to the mount."""
    folder = mount / path.strip("/")
    if not folder.is_dir():  # a cgroup namespace: the process sees its own cgroup as the mount's root
        folder = mount
    rooms = []
    while True:
        room = _room(folder, limit_file, usage_file, file_pages, cache_key)
        if room is not None:
            rooms.append(room)
        if folder == mount or not folder.is_relative_to(mount):
            return rooms
        folder = folder.parent


def _room(folder: Path, limit_file: str, usage_file: str, file_pages: tuple[str, str], cache_key: str) -> int | None:
    try:
        limit_text = (folder / limit_file).read_text().strip()
        if limit_text == "max" or int(limit_text) >= UNLIMITED:
            return None
        usage = int((folder / usage_file).read_text())
        stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines() if line.strip())
    except (OSError, ValueError):
        return None
    if all(key in stat for key in file_pages):
        reclaimable = sum(int(stat[key]) for key in file_pages)
    else:  # older kernels: the v1 cache figure, or v2's one file figure, or the non-hierarchical names
        names = (cache_key, cache_key.removeprefix("total_"), "file")
        reclaimable = next((int(stat[name]) for name in names if name in stat), 0)
    return int(limit_text) - max(0, usage - reclaimable)
