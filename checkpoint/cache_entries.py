"""The quantized-checkpoint cache's entries found without torch: where they live, what names a
source, whether an entry is complete. ``quant.cache`` writes and reads entries with these; the
console script's read-ahead (``checkpoint.readahead``), which runs before torch is imported, finds
the entry a ``--bits`` run of a float checkpoint will load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dsmoe.checkpoint.safetensors_header import INDEX_NAME

CACHE_FORMAT = 2
"""Raised when what an entry holds for a given key changes, so old entries are no longer found
(2: 4-bit weights in the kernels' layout, and the lm_head of 4-bit entries in q6, QuantSpec.lm_head)."""
MANIFEST = "dsmoe-cache.json"
_IDENTITY_FILES = ("config.json", INDEX_NAME)


def cache_root() -> Path:
    """Where quantized entries go: ``$DSMOE_CACHE/quantized``, default ``~/.cache/dsmoe/quantized``."""
    base = os.environ.get("DSMOE_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "dsmoe") / "quantized"


def source_identity(folder: Path) -> dict[str, Any]:
    """What names a source's contents cheaply: a hub snapshot's repo and commit, else the resolved
    folder and each weight file's name, size and mtime."""
    resolved = folder.resolve()
    parts = resolved.parts
    if "snapshots" in parts:
        at = len(parts) - 1 - parts[::-1].index("snapshots")
        if at >= 1 and parts[at - 1].startswith("models--") and at + 1 < len(parts):
            return {"hub": parts[at - 1], "commit": parts[at + 1], "subfolder": "/".join(parts[at + 2:])}
    files = sorted(p for p in resolved.iterdir() if p.suffix == ".safetensors" or p.name in _IDENTITY_FILES)
    stats = [(p.name, p.stat()) for p in files]
    return {"path": str(resolved), "files": [[name, st.st_size, st.st_mtime_ns] for name, st in stats]}


def entry_files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


def _manifest(entry: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _lists_its_files(entry: Path, manifest: dict[str, Any]) -> bool:
    try:
        return manifest.get("format") == CACHE_FORMAT and bool(manifest.get("files")) and \
            manifest["files"] == entry_files(entry)
    except OSError:
        return False


def is_complete(entry: Path) -> bool:
    """Whether ``entry`` holds exactly the files, of the sizes, its manifest lists."""
    manifest = _manifest(entry)
    return manifest is not None and _lists_its_files(entry, manifest)


def entry_to_read(folder: Path, bits: int, root: Path | None = None) -> Path | None:
    """The one complete entry of ``folder`` quantized to ``bits``, or None where there is none or
    more than one (another format, block size or lm_head asked for before): which of them a run
    loads depends on its flags, and a read-ahead of the wrong one would spend the disk for nothing."""
    root = root or cache_root()
    try:
        source = source_identity(folder)
        candidates = [entry for entry in root.iterdir() if not entry.name.startswith(".")]
    except OSError:
        return None
    found = []
    for entry in candidates:
        manifest = _manifest(entry)
        if (manifest is not None and manifest.get("source") == source and isinstance(manifest.get("spec"), dict)
                and manifest["spec"].get("bits") == bits and _lists_its_files(entry, manifest)):
            found.append(entry)
    return found[0] if len(found) == 1 else None
