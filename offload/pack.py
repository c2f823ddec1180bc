"""The expert pack: a checkpoint's routed experts in the CPU kernels' own layout, one aligned record
per expert, so the disk tier reads a miss with one direct read into its slot and nothing else.

Reading experts from the safetensors files cost ~27 ms per 4.9 MB expert at the 16B geometry
(twelve scattered tensor reads into fresh memory, then the 4-bit repack; docs/PERFORMANCE.md),
where the disk alone needs ~3-8 ms. A pack stores each expert's projections as the kernels read
them (4-bit: dsmoe's native nibble layout with fp32 block scales; 8-bit: int8 rows with their
scales), padded to ``ALIGN`` bytes, so a read can bypass the page cache (``O_DIRECT``: under a
memory cgroup the page cache counts against the cap, and a buffered read would hold each expert
twice). ``ExpertSlots`` gives each MoE layer a fixed number of slots in memory of its own, each
with modules built once over that memory (their runtime scales included): a miss overwrites a
slot's bytes in place, so the modules and the native kernels bound to their addresses stay valid.

A pack is written once, on first use, into ``$DSMOE_CACHE/experts`` (default
``~/.cache/dsmoe/experts``), beside the quantized-checkpoint cache and keyed the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dsmoe.checkpoint.output_folder import rename_no_replace
from dsmoe.errors import CheckpointError
from dsmoe.model.deepseek import MLP
from dsmoe.model.layer_plan import building_detached
from dsmoe.quant import Linear4bit, Linear8bit
from dsmoe.quant.cache import clear_stale_staging, source_identity
from dsmoe.quant.spec import QuantSpec
from dsmoe.quant.state import FourBitState

PACK_FORMAT = 2
"""Raised when a record's layout changes, so packs of an older layout are no longer found."""
ALIGN = 4096
"""Record alignment in the file and in memory: what O_DIRECT needs on the usual 4 KiB-block disks."""
FIELD_ALIGN = 64
"""Each tensor's start within a record: a cache line, and any dtype's alignment."""
DATA = "experts.bin"
MANIFEST = "pack.json"
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
SYNC_EVERY = 64 * 2**20
"""Bytes written between flushes while packing: written pages are then dropped from the page cache,
which a memory cgroup would otherwise charge to the process."""

_DTYPES = {"uint8": torch.uint8, "int8": torch.int8, "float32": torch.float32, "bfloat16": torch.bfloat16}


def pack_root() -> Path:
    """``$DSMOE_CACHE/experts``, default ``~/.cache/dsmoe/experts``."""
    base = os.environ.get("DSMOE_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "dsmoe") / "experts"


@dataclass(frozen=True)
class Field:
    """One tensor of a record: ``proj``'s ``name`` at ``offset`` bytes into the record."""

    proj: str
    name: str
    offset: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=_DTYPES[self.dtype]).element_size()


@dataclass(frozen=True)
class Layout:
    """How every record of a pack is laid out (all experts of a model share one format)."""

    bits: int
    quant_type: str
    blocksize: int
    hidden: int
    inter: int
    fields: tuple[Field, ...]
    record_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "fields": [dataclasses.asdict(f) for f in self.fields]}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "Layout":
        fields = tuple(Field(f["proj"], f["name"], int(f["offset"]), f["dtype"], tuple(f["shape"])) for f in raw["fields"])
        return cls(int(raw["bits"]), str(raw["quant_type"]), int(raw["blocksize"]), int(raw["hidden"]),
                   int(raw["inter"]), fields, int(raw["record_bytes"]))


def _tensors_of(module: nn.Module) -> dict[tuple[str, str], torch.Tensor] | None:
    """The tensors a record stores for this expert, or None if it is not in a packable format."""
    out: dict[tuple[str, str], torch.Tensor] = {}
    for proj in PROJECTIONS:
        linear = getattr(module, proj)
        if isinstance(linear, Linear4bit) and linear.layout == "native":
            out[(proj, "weight")] = linear.weight
            out[(proj, "absmax")] = linear._absmax_f32()
            out[(proj, "quant_map")] = linear.quant_map.float()
            out[(proj, "runtime_absmax")] = linear.runtime_absmax
        elif isinstance(linear, Linear8bit) and linear.native:
            out[(proj, "weight")] = linear.weight
            out[(proj, "SCB")] = linear.SCB
            out[(proj, "scale")] = linear.scale
        else:
            return None
    return out


def layout_of(module: nn.Module) -> Layout | None:
    """The record layout for experts like ``module``, or None when its format has no pack (floats,
    or a layer not on dsmoe's CPU kernels)."""
    tensors = _tensors_of(module)
    if tensors is None:
        return None
    gate = module.get_submodule("gate_proj")
    assert isinstance(gate, (Linear4bit, Linear8bit))  # _tensors_of took only these
    fields, offset = [], 0
    for (proj, name), tensor in tensors.items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        fields.append(Field(proj, name, offset, dtype, tuple(tensor.shape)))
        offset += -(-tensor.numel() * tensor.element_size() // FIELD_ALIGN) * FIELD_ALIGN
    record = -(-offset // ALIGN) * ALIGN
    if isinstance(gate, Linear4bit):
        return Layout(4, gate.quant_type, gate.blocksize, gate.in_features, gate.out_features, tuple(fields), record)
    return Layout(8, "int8", 0, gate.in_features, gate.out_features, tuple(fields), record)


def pack_path(folder: Path, spec: QuantSpec | None, root: Path | None = None) -> Path:
    """The pack of ``folder``'s experts in ``spec`` (None: as stored): ``<source name>-<key>``."""
    material = {"format": PACK_FORMAT, "source": source_identity(folder),
                "spec": dataclasses.asdict(spec) if spec is not None else "stored"}
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", folder.resolve().name)[:60]
    return (root or pack_root()) / f"{readable}-{key}"


def read_manifest(entry: Path) -> dict[str, Any] | None:
    """The entry's manifest when the entry is complete (its data file has the size it says), else None."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
        size = (entry / DATA).stat().st_size
        if not isinstance(manifest, dict) or manifest.get("format") != PACK_FORMAT:
            return None
        layout = Layout.from_json(manifest["layout"])
        if size != layout.record_bytes * len(manifest["experts"]) or size == 0:
            return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_pack(build: Callable[[int, int], nn.Module], keys: list[tuple[int, int]], entry: Path,
               source: dict[str, Any]) -> None:
    """Write every expert in ``keys`` (built by ``build(layer, expert)``) as one pack at ``entry``.

    Staged in a folder of its own and renamed into place without replacing anything, so a reader
    finds a whole pack or none; of two writers, the first rename stands. Raises CheckpointError when
    the experts have no packable format, OSError when the disk refuses.
    """
    entry.parent.mkdir(parents=True, exist_ok=True)
    clear_stale_staging(entry)  # a writer killed mid-pack left gigabytes behind
    staging = entry.with_name(f".{entry.name}.staging-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        layout: Layout | None = None
        with open(staging / DATA, "wb") as out:
            unsynced = 0
            for layer, expert in keys:
                with building_detached():
                    module = build(layer, expert)
                tensors = _tensors_of(module)
                if layout is None:
                    layout = layout_of(module)
                if tensors is None or layout is None:
                    raise CheckpointError(f"expert {expert} of layer {layer} is in no format an expert pack stores")
                record = bytearray(layout.record_bytes)
                for field in layout.fields:
                    tensor = tensors[(field.proj, field.name)].contiguous()
                    if tuple(tensor.shape) != field.shape or str(tensor.dtype).removeprefix("torch.") != field.dtype:
                        raise CheckpointError(f"expert {expert} of layer {layer}: {field.proj}.{field.name} is "
                                              f"{tensor.dtype} {list(tensor.shape)}, the pack's other experts "
                                              f"{field.dtype} {list(field.shape)}")
                    raw = tensor.view(torch.uint8).reshape(-1).numpy().tobytes()
                    record[field.offset: field.offset + len(raw)] = raw
                out.write(record)
                unsynced += len(record)
                if unsynced >= SYNC_EVERY:
                    _flush_and_drop(out)
                    unsynced = 0
            _flush_and_drop(out)
        assert layout is not None
        manifest = {"format": PACK_FORMAT, "source": source, "layout": layout.to_json(),
                    "experts": [list(key) for key in keys]}
        (staging / MANIFEST).write_text(json.dumps(manifest) + "\n", encoding="utf-8")
        rename_no_replace(staging, entry)
    except FileExistsError:
        shutil.rmtree(staging, ignore_errors=True)  # another process finished first: its pack stands
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _flush_and_drop(handle: Any) -> None:
    handle.flush()
    os.fdatasync(handle.fileno())
    os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


class PackReader:
    """Reads whole records into caller-owned aligned memory: direct I/O where the filesystem takes
    it (no page-cache copy), else buffered reads whose pages are dropped right after."""

    def __init__(self, entry: Path) -> None:
        manifest = read_manifest(entry)
        if manifest is None:
            raise CheckpointError(f"{entry}: not a complete expert pack")
        self.entry = entry
        self.layout = Layout.from_json(manifest["layout"])
        self.index = {(int(layer), int(expert)): i for i, (layer, expert) in enumerate(manifest["experts"])}
        path = entry / DATA
        self.fd = os.open(path, os.O_RDONLY)
        self.direct_fd: int | None = None
        try:
            self.direct_fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        except OSError:
            self.direct_fd = None
        self.direct = self.direct_fd is not None and hasattr(os, "O_DIRECT")

    def read(self, layer: int, expert: int, into: memoryview) -> None:
        """Record (layer, expert) into ``into`` (``record_bytes`` long, ALIGN-aligned)."""
        try:
            offset = self.index[(layer, expert)] * self.layout.record_bytes
        except KeyError:
            raise CheckpointError(f"{self.entry}: routed expert {expert} of layer {layer} is not in the pack") from None
        if self.direct:
            try:
                self._read_all(self.direct_fd, into, offset)  # type: ignore[arg-type]  # set when direct
                return
            except OSError:  # the filesystem took the flag but not the read (EINVAL): buffered from now on
                self.direct = False
        self._read_all(self.fd, into, offset)
        os.posix_fadvise(self.fd, offset, len(into), os.POSIX_FADV_DONTNEED)

    def _read_all(self, fd: int, into: memoryview, offset: int) -> None:
        done, total = 0, len(into)
        while done < total:
            got = os.preadv(fd, [into[done:]], offset + done)
            if got == 0:
                raise CheckpointError(f"{self.entry / DATA}: file ended inside a record (was it truncated?)")
            done += got

    def close(self) -> None:
        for fd in (self.fd, self.direct_fd):
            if fd is not None:
                os.close(fd)
        self.direct_fd = None


class ExpertSlots:
    """``slots`` experts per MoE layer in memory the store owns, each slot's modules built once.

    ``fill`` reads an expert into a free slot of its layer and returns the slot's module; ``release``
    frees the slot. The memory is one anonymous mapping per layer: its pages count in RSS once
    touched, and only those, so a store sized by a budget never grows past it.
    """

    def __init__(self, reader: PackReader, layers: list[int], slots: int, compute_dtype: torch.dtype) -> None:
        self.reader = reader
        self.layout = reader.layout
        self.slots = slots
        self.compute_dtype = compute_dtype
        self._memory = {layer: mmap.mmap(-1, max(1, slots * self.layout.record_bytes)) for layer in layers}
        self._modules: dict[tuple[int, int], nn.Module] = {}
        self._free = {layer: list(range(slots - 1, -1, -1)) for layer in layers}
        self._where: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()

    def nbytes(self) -> int:
        return self.layout.record_bytes

    def fill(self, layer: int, expert: int) -> nn.Module:
        """Expert ``expert`` of ``layer`` read into a free slot of that layer (safe from any thread)."""
        with self._lock:
            if not self._free[layer]:
                raise RuntimeError(f"expert store bug: no free slot in layer {layer} for expert {expert}")
            slot = self._free[layer].pop()
            self._where[(layer, expert)] = slot
        size = self.layout.record_bytes
        self.reader.read(layer, expert, memoryview(self._memory[layer])[slot * size: (slot + 1) * size])
        return self._module(layer, slot)

    def release(self, layer: int, expert: int) -> None:
        with self._lock:
            slot = self._where.pop((layer, expert), None)
            if slot is not None:
                self._free[layer].append(slot)

    def _module(self, layer: int, slot: int) -> nn.Module:
        key = (layer, slot)
        module = self._modules.get(key)
        if module is None:
            # Normal tensors, as the loader's: a slot built during generation would otherwise hold
            # inference tensors, which no later code outside inference mode may touch.
            with building_detached(), torch.inference_mode(False):
                module = self._build(layer, slot)
            with self._lock:
                module = self._modules.setdefault(key, module)
        return module

    def _build(self, layer: int, slot: int) -> nn.Module:
        """An MLP whose tensors are views of the slot's bytes (the record's fields)."""
        layout = self.layout
        region = torch.frombuffer(self._memory[layer], dtype=torch.uint8)
        base = slot * layout.record_bytes
        views: dict[tuple[str, str], torch.Tensor] = {}
        for field in layout.fields:
            raw = region[base + field.offset: base + field.offset + field.nbytes]
            views[(field.proj, field.name)] = raw.view(_DTYPES[field.dtype]).view(field.shape)
        with torch.device("meta"):
            module = MLP(layout.hidden, layout.inter)
        module.requires_grad_(False)
        for proj in PROJECTIONS:
            shape = (layout.inter, layout.hidden) if proj != "down_proj" else (layout.hidden, layout.inter)
            # The runtime scales are the record's too: a refill needs no arithmetic on the reader
            # threads, whose torch ops would start thread teams beside the compute's (prefill ran
            # 15% slower when the scales were recomputed after each read).
            if layout.bits == 4:
                state = FourBitState(torch.Size(shape), layout.quant_type, layout.blocksize, self.compute_dtype,
                                     views[(proj, "absmax")], views[(proj, "quant_map")])
                linear: nn.Module = Linear4bit(views[(proj, "weight")], state, self.compute_dtype, layout="native",
                                               native_scales=views[(proj, "runtime_absmax")])
            else:
                linear = Linear8bit(views[(proj, "weight")], views[(proj, "SCB")], self.compute_dtype)
                linear.register_buffer("scale", views[(proj, "scale")], persistent=False)
            module._modules[proj] = linear
        return module

    def close(self) -> None:
        self._modules.clear()
        self.reader.close()
