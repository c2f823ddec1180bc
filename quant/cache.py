"""The quantized-checkpoint cache: the first ``--bits 4`` (or 8) load of a float checkpoint writes
it quantized, and later starts load that copy as a stored checkpoint, as ollama users expect.

An entry lives at ``$DSMOE_CACHE/quantized/<name>`` (default ``~/.cache/dsmoe``), named by the
source folder, the format and a key. The key covers what decides the bytes: the source's identity
(a Hugging Face snapshot's repo and commit; otherwise the resolved folder and each weight file's
name, size and mtime, cheap to read, no hash of the contents) and the whole ``QuantSpec``. The
compute dtype is left out: it does not change a stored byte.

An entry stores its 4-bit weights in dsmoe's kernel layout, each beside its kernel scales
(``quant.state.NATIVE_SCALES``; ``dsmoe_kernel_layout`` in its config), so that a load maps them
rather than reading and repacking them: the 8-layer 16B geometry's second start went from 8.8-13.4 s
to 2.9-3.2 s. transformers cannot read such an entry; ``dsmoe quantize`` still writes its layout.

An entry is written by ``quant.convert.quantize_checkpoint`` into a staging folder, given a
manifest (every file and its size) and renamed into place without replacing anything, so a reader
sees a complete entry or none, and of two processes racing, one entry stands. An entry whose
manifest does not match its files is not used: it is set aside and written again. Nothing here
fails a load: a cache that cannot be written says why in its ``CacheOutcome``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from dsmoe.checkpoint.output_folder import rename_no_replace
from dsmoe.checkpoint.reader import INDEX_NAME, Checkpoint
from dsmoe.errors import DsmoeError
from dsmoe.native.library import ACT_BLOCK, Q6_BLOCK_BYTES
from dsmoe.quant.convert import quantize_checkpoint
from dsmoe.quant.spec import QuantSpec, spec_for

CACHE_FORMAT = 2
"""Raised when what an entry holds for a given key changes, so old entries are no longer found
(2: 4-bit weights in the kernels' layout, and the lm_head of 4-bit entries in q6, QuantSpec.lm_head)."""
MANIFEST = "dsmoe-cache.json"
SPACE_MARGIN = 512 * 2**20
"""Bytes left free beyond the entry's size: a cache must not be what fills the disk."""
_IDENTITY_FILES = ("config.json", INDEX_NAME)

Action = Literal["read", "written", "not_written"]


@dataclass(frozen=True)
class CacheOutcome:
    """What a load did with the cache: read the entry at ``path``, wrote it, or could not (``reason``)."""

    path: Path
    action: Action
    reason: str = ""
    replaced: bool = False
    """A partial or damaged entry was at ``path`` and was set aside."""

    @property
    def usable(self) -> bool:
        return self.action in ("read", "written")


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


def entry_path(folder: Path, spec: QuantSpec, root: Path | None = None) -> Path:
    """The entry for ``folder`` quantized as ``spec``: ``<source name>-<format>-<key>``."""
    material = {"format": CACHE_FORMAT, "source": source_identity(folder), "spec": dataclasses.asdict(spec)}
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", folder.resolve().name)[:60]
    head = ("-lmhead6" if spec.lm_head == "q6" else "-lmhead8") if spec.quantize_lm_head else ""
    return (root or cache_root()) / f"{readable}-{spec.name}-b{spec.blocksize}{head}-{key}"


def _files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


def is_complete(entry: Path) -> bool:
    """Whether ``entry`` holds exactly the files, of the sizes, its manifest lists."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
        return (isinstance(manifest, dict) and manifest.get("format") == CACHE_FORMAT
                and manifest.get("files") == _files(entry) and bool(manifest["files"]))
    except (OSError, ValueError, KeyError):
        return False


def discard(entry: Path) -> None:
    """Move a damaged entry out of the way (one rename, so no reader sees half of it) and delete it."""
    aside = entry.with_name(f".{entry.name}.discarded-{os.getpid()}")
    try:
        os.rename(entry, aside)
    except FileNotFoundError:
        return  # another process discarded it first
    shutil.rmtree(aside, ignore_errors=True)


def quantized_bytes(checkpoint: Checkpoint, spec: QuantSpec) -> int:
    """About how many bytes ``checkpoint`` quantized as ``spec`` takes (the disk check's need)."""
    total = 0
    for name in checkpoint.tensor_names():
        layer = spec_for(name, spec)
        nbytes = checkpoint.nbytes(name)
        if layer is None:
            total += nbytes
            continue
        numel = 1
        for size in checkpoint.shape(name):
            numel *= size
        if layer.bits == 4:
            total += numel // 2 + 4 * (-(-numel // layer.blocksize))
        elif layer.bits == 6:  # the codes and an fp16 step per block
            total += numel // ACT_BLOCK * (Q6_BLOCK_BYTES + 2)
        else:
            total += numel + 4 * checkpoint.shape(name)[0]
    return total


def clear_stale_staging(entry: Path) -> None:
    """Remove the staging folders of writers of this entry that were killed (their process is gone)."""
    prefix = f".{entry.name}.staging-"
    for path in entry.parent.glob(f"{prefix}*"):
        pid = re.match(r"\d+", path.name[len(prefix):])
        if pid is None or int(pid.group()) == os.getpid():
            continue
        try:
            os.kill(int(pid.group()), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            pass


def write_entry(checkpoint: Checkpoint, spec: QuantSpec, entry: Path, replaced: bool = False) -> CacheOutcome:
    """Quantize ``checkpoint`` into ``entry``; never raises for the disk's sake, says why instead."""
    def not_written(reason: str) -> CacheOutcome:
        return CacheOutcome(entry, "not_written", reason, replaced)

    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(entry.parent).free
    except OSError as exc:
        return not_written(f"cannot create {entry.parent} ({exc.strerror or exc})")
    need = quantized_bytes(checkpoint, spec)
    if free < need + SPACE_MARGIN:
        return not_written(f"{free / 1e9:.1f} GB free in {entry.parent}, the quantized copy needs "
                           f"{need / 1e9:.1f} GB and {SPACE_MARGIN / 1e9:.1f} GB are kept free")
    clear_stale_staging(entry)
    staging = entry.with_name(f".{entry.name}.staging-{os.getpid()}")
    try:
        shutil.rmtree(staging, ignore_errors=True)
        quantize_checkpoint(checkpoint.path, staging, spec, compute_dtype=torch.bfloat16, kernel_layout=True)
        manifest = {"format": CACHE_FORMAT, "source": source_identity(checkpoint.path),
                    "spec": dataclasses.asdict(spec), "files": _files(staging)}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        rename_no_replace(staging, entry)
    except FileExistsError:  # another process finished first: its entry stands
        shutil.rmtree(staging, ignore_errors=True)
        if is_complete(entry):
            return CacheOutcome(entry, "read", replaced=replaced)
        return not_written(f"{entry} appeared while writing it and is not complete")
    except (OSError, DsmoeError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return not_written(reason)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return CacheOutcome(entry, "written", replaced=replaced)


def through_cache(checkpoint: Checkpoint, spec: QuantSpec, root: Path | None = None) -> CacheOutcome:
    """The entry for ``checkpoint`` as ``spec``: read when complete, else (re)written now."""
    entry = entry_path(checkpoint.path, spec, root)
    if is_complete(entry):
        return CacheOutcome(entry, "read")
    replaced = os.path.lexists(entry)
    if replaced:
        discard(entry)
    return write_entry(checkpoint, spec, entry, replaced)
