"""The quantized-checkpoint cache: the first ``--bits 4`` (or 8) load of a float checkpoint writes
it quantized, and later starts load that copy as a stored checkpoint, as ollama users expect.

An entry lives at ``$DSMOE_CACHE/quantized/<name>`` (default ``~/.cache/dsmoe``), named by the
source folder, the format and a key. The key covers what decides the bytes: the source's identity
(a Hugging Face snapshot's repo and commit; otherwise the resolved folder and each weight file's
name, size and mtime, cheap to read, no hash of the contents) and the whole ``QuantSpec``. The
compute dtype is left out: it does not change a stored byte.

An entry stores its 4-bit weights in dsmoe's kernel layout, each beside its kernel scales
(``checkpoint.lazy.NATIVE_SCALES``; ``dsmoe_kernel_layout`` in its config), so that a load maps them
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
from typing import Literal

import torch

from dsmoe.checkpoint.cache_entries import (CACHE_FORMAT, MANIFEST, entry_files, cache_root, is_complete,
                                            source_identity)
from dsmoe.checkpoint.output_folder import rename_no_replace
from dsmoe.checkpoint.reader import Checkpoint
from dsmoe.errors import DsmoeError
from dsmoe.native.library import ACT_BLOCK, Q6_BLOCK_BYTES
from dsmoe.quant.convert import quantize_checkpoint
from dsmoe.quant.spec import QuantSpec, spec_for

SPACE_MARGIN = 512 * 2**20
"""Bytes left free beyond the entry's size: a cache must not be what fills the disk."""

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


def entry_path(folder: Path, spec: QuantSpec, root: Path | None = None) -> Path:
    """The entry for ``folder`` quantized as ``spec``: ``<source name>-<format>-<key>``."""
    material = {"format": CACHE_FORMAT, "source": source_identity(folder), "spec": dataclasses.asdict(spec)}
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", folder.resolve().name)[:60]
    head = ("-lmhead6" if spec.lm_head == "q6" else "-lmhead8") if spec.quantize_lm_head else ""
    return (root or cache_root()) / f"{readable}-{spec.name}-b{spec.blocksize}{head}-{key}"


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
                    "spec": dataclasses.asdict(spec), "files": entry_files(staging)}
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
