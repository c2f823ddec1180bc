"""Read a checkpoint folder lazily: config, shard index, and tensors one at a time.

Every shard's header is checked up front against its file size, so a truncated or corrupted
download fails at open with the file named, not halfway through loading.

Tensors are read with positioned reads into fresh memory rather than returned as views of a
memory map: the file's pages stay in the page cache (not the process's RSS), and the process
holds exactly the tensors it keeps. Loading 33 GB of bf16 into a 9 GB 4-bit model therefore
peaks near 9 GB of RSS, not near the size of the shards it read. A tensor the model keeps exactly
as stored, and that only alignment-agnostic kernels read (a 4-bit weight in dsmoe's kernel layout),
is mapped instead (``Checkpoint.map``), as llama.cpp maps its files: nothing is copied at load,
and its pages are the page cache's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import stat
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from io import FileIO
from typing import Any, Iterator, Sequence

import torch

from dsmoe.errors import CheckpointError
from dsmoe.checkpoint.config import DeepseekConfig
from dsmoe.checkpoint.huge_pages import huge_page_bytes
from dsmoe.checkpoint.safetensors_header import (
    DTYPE_BYTES, INDEX_NAME, MAX_HEADER_BYTES, TensorInfo, header_bytes, open_regular, parse_json, read_safetensors_header,
)

MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
"""Linux's madvise advice (5.14 and later) that maps a range's pages in, reading them if needed;
Python's mmap module names it from 3.13 on."""

READ_AHEAD_BYTES = 64 * 2**20
"""How far ``read_ahead`` reads ahead: a few expert matrices, little beside a model."""

SINGLE_NAME = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
# What dsmoe reads from a checkpoint folder, so all it downloads from a hub repo.
DOWNLOAD_PATTERNS = ["config.json", INDEX_NAME, "*.safetensors", *TOKENIZER_FILES]

_TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
def checkpoint_fingerprint(folder: Path) -> str:
    """A hash that changes when a checkpoint's weights, config or tokenizer change.

    Over every file's name, size and modification time, the whole of each JSON file (config,
    index, tokenizer) and each safetensors file's header: cheap, since no weights are read.
    """
    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        try:
            info = path.stat()
        except OSError:
            continue
        if not stat.S_ISREG(info.st_mode):
            continue
        digest.update(json.dumps([path.name, info.st_size, info.st_mtime_ns]).encode())
        if path.suffix == ".safetensors":
            try:
                digest.update(header_bytes(path)[0])
            except CheckpointError:
                digest.update(b"unreadable")
        elif path.suffix == ".json" and info.st_size <= MAX_HEADER_BYTES:
            with open_regular(path, "file") as handle:
                digest.update(handle.read())
    return digest.hexdigest()


class Checkpoint:
    """A checkpoint folder in the official Hugging Face layout, read lazily."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.raw_config: dict[str, Any] = _read_json(path / "config.json")
        self.config = DeepseekConfig.from_dict(self.raw_config, source=str(path / "config.json"))
        self._tensors = self._index()
        self._handles: dict[Path, FileIO] = {}
        self._maps: dict[Path, mmap.mmap] = {}

    def _index(self) -> dict[str, TensorInfo]:
        index_path = self.path / INDEX_NAME
        if index_path.exists():
            index = _read_json(index_path)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: no weight_map")
            shards = sorted({self._shard_name(shard, index_path) for shard in weight_map.values()})
        elif (self.path / SINGLE_NAME).exists():
            weight_map, shards = None, [SINGLE_NAME]
        else:
            found = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not found:
                raise CheckpointError(f"{self.path}: no safetensors weights (expected {INDEX_NAME} or {SINGLE_NAME})")
            weight_map, shards = None, found
        tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            tensors.update(read_safetensors_header(self.path / shard))
        if weight_map is not None:
            for name, shard in weight_map.items():
                info = tensors.get(name)
                if info is None or info.shard.name != shard:
                    raise CheckpointError(f"{self.path / shard}: tensor {name!r} listed in {INDEX_NAME} is not in it")
        return tensors

    def _shard_name(self, shard: Any, index_path: Path) -> str:
        """A shard named by the index: a plain file name in the checkpoint folder, nothing else."""
        if not isinstance(shard, str) or shard in ("", ".", "..") or Path(shard).name != shard or "\\" in shard:
            raise CheckpointError(f"{index_path}: {shard!r} is not a shard file name in the checkpoint folder")
        return shard

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def dtype(self, name: str) -> str:
        return self._info(name).dtype

    def shard_of(self, name: str) -> Path:
        return self._info(name).shard

    def nbytes(self, name: str) -> int:
        return self._info(name).nbytes

    def _info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint") from None

    def get(self, name: str) -> torch.Tensor:
        """One tensor as stored, read into memory of its own."""
        info = self._info(name)
        handle = self._handles.get(info.shard)
        if handle is None:
            try:
                handle = info.shard.open("rb", buffering=0)
            except OSError as exc:
                raise CheckpointError(f"{info.shard}: cannot be read ({exc.strerror})") from None
            self._handles[info.shard] = handle
        raw = torch.empty(info.nbytes, dtype=torch.uint8)
        handle.seek(info.offset)
        if handle.readinto(raw.numpy().data) != info.nbytes:
            raise CheckpointError(f"{info.shard}: truncated while reading tensor {name!r}")
        return raw.view(_TORCH_DTYPES[info.dtype]).reshape(info.shape)

    def map(self, name: str, populate: bool = True) -> torch.Tensor:
        """One tensor as a copy-on-write view of its shard's mapping: no copy at load (a stored
        8-layer 4-bit model spent 1.7 s of its 2 s load copying the page cache into fresh memory).
        Its pages are mapped in now (``MADV_POPULATE_READ``, reading them from disk if they are not
        cached), not at first use: left to fault in, they cost the first prompt's prefill 0.05-0.15
        s at that size. ``populate`` False leaves them to fault in, for a tensor of which a run
        reads little or nothing (an embedding table's rows, bitsandbytes' absmax beside the kernel
        scales): those bytes are then never read from disk at all. ``read_ahead`` calls this on its
        reader thread, beside the load's compute. The mapping is advised ``MADV_HUGEPAGE``: pages
        the load faults in from disk come into the cache in 2 MB folios, mapped as huge pages, as
        are those already cached so (``checkpoint.huge_pages``). The mapping lives as long as a
        tensor of it: the file must not be truncated meanwhile (a cache entry or a downloaded
        snapshot never is)."""
        info = self._info(name)
        mapping = self._maps.get(info.shard)
        if mapping is None:
            try:
                with info.shard.open("rb") as handle:
                    mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{info.shard}: cannot be mapped ({exc})") from None
            if huge_page_bytes() is not None:
                mapping.madvise(mmap.MADV_HUGEPAGE)
            self._maps[info.shard] = mapping
        if info.nbytes == 0 or info.offset % DTYPE_BYTES[info.dtype]:
            return self.get(name)  # nothing to map, or a writer that did not align it: a view cannot
        start = info.offset - info.offset % mmap.PAGESIZE
        if populate:
            try:
                mapping.madvise(MADV_POPULATE_READ, start, info.offset + info.nbytes - start)
            except OSError:  # a kernel before 5.14: read ahead, and let the pages fault in at first use
                mapping.madvise(mmap.MADV_WILLNEED, start, info.offset + info.nbytes - start)
        elif (page := huge_page_bytes()) is not None and info.nbytes >= 2 * page:
            # Read a row at a time (the embedding's), each fault of a huge-page mapping would read 2 MB.
            mapping.madvise(mmap.MADV_NOHUGEPAGE, start, info.offset + info.nbytes - start)
        flat = torch.frombuffer(mapping, dtype=torch.uint8, count=info.nbytes, offset=info.offset)
        return flat.view(_TORCH_DTYPES[info.dtype]).reshape(info.shape)

    def rows(self, name: str) -> "TensorRows":
        """Rows of a 2-D tensor read on demand (an embedding table a token needs one row of)."""
        return TensorRows(self._info(name), name)

    def tokenizer_files(self) -> list[Path]:
        return [self.path / name for name in TOKENIZER_FILES if (self.path / name).exists()]

    def total_bytes(self) -> int:
        return sum(self.nbytes(n) for n in self._tensors)

    def close(self) -> None:
        """Closes the files; mapped tensors stay valid (each keeps its mapping alive)."""
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        self._maps.clear()


def read_ahead(checkpoint: Checkpoint, groups: Sequence[Sequence[str]], window: int = READ_AHEAD_BYTES,
               mapped: frozenset[str] = frozenset(), lazy: frozenset[str] = frozenset()
               ) -> Iterator[dict[str, torch.Tensor]]:
    """Each group's tensors, in order, read on a thread of their own up to ``window`` bytes ahead of
    the caller, so the reads overlap what the caller does with them: a stored 4-bit load spent half
    its time in reads that waited for the repack before them. Names in ``mapped`` are mapped
    (``Checkpoint.map``) rather than read, those in ``lazy`` mapped with their pages left to fault
    in. The caller must not read from ``checkpoint`` itself while it iterates; the window bounds
    the memory read ahead (a lazy tensor counts nothing against it)."""
    pending: deque[tuple[int, Future[dict[str, torch.Tensor]]]] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsmoe-read") as reader:
        queued, ahead = 0, 0
        try:
            while queued < len(groups) or pending:
                while queued < len(groups) and (not pending or ahead < window):
                    names = groups[queued]
                    nbytes = sum(checkpoint.nbytes(name) for name in names if name not in lazy)
                    pending.append((nbytes, reader.submit(_read_group, checkpoint, names, mapped, lazy)))
                    queued, ahead = queued + 1, ahead + nbytes
                nbytes, future = pending.popleft()
                ahead -= nbytes
                yield future.result()
        finally:
            for _, future in pending:
                future.cancel()


@contextlib.contextmanager
def one_thread_for_the_reader() -> Iterator[None]:
    """One thread fewer for torch's and dsmoe's compute while ``read_ahead`` reads: with every core
    in the compute's thread team, the reader's core held back a thread at each of its barriers. On 2
    cores, a stored 8-layer 4-bit load took 1.8-2.2 s this way against 3.0-3.7 s, and quantizing the
    bf16 checkpoint while loading 7.4-7.8 s against 12.1-12.2 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _read_group(checkpoint: Checkpoint, names: Sequence[str], mapped: frozenset[str],
                lazy: frozenset[str]) -> dict[str, torch.Tensor]:
    return {name: checkpoint.map(name) if name in mapped else checkpoint.map(name, populate=False) if name in lazy
            else checkpoint.get(name) for name in names}


class TensorRows:
    """A 2-D tensor of a shard, of which ``get(ids)`` reads only the rows asked for.

    Keeps a descriptor of its own open; reads are positioned (``os.preadv``), so threads may share it.
    """

    def __init__(self, info: TensorInfo, name: str) -> None:
        if len(info.shape) != 2 or info.dtype not in _TORCH_DTYPES:
            raise CheckpointError(f"{info.shard}: tensor {name!r} is {info.dtype} {list(info.shape)}, not a table of rows")
        self.info, self.name = info, name
        self.dtype = _TORCH_DTYPES[info.dtype]
        self.shape: tuple[int, int] = (info.shape[0], info.shape[1])
        self.row_bytes = info.nbytes // info.shape[0]
        try:
            self.fd: int | None = os.open(info.shard, os.O_RDONLY)
        except OSError as exc:
            raise CheckpointError(f"{info.shard}: cannot be read ({exc.strerror})") from None

    def get(self, ids: list[int]) -> torch.Tensor:
        """Rows ``ids`` (each in range) as a [len(ids), width] tensor of the stored dtype."""
        assert self.fd is not None, "rows read after close"
        out = torch.empty((len(ids), self.row_bytes), dtype=torch.uint8)
        view = memoryview(out.numpy().data).cast("B")
        for i, row in enumerate(ids):
            if not 0 <= row < self.shape[0]:
                raise IndexError(f"row {row} of {self.name} ({self.shape[0]} rows)")
            start = i * self.row_bytes
            if os.preadv(self.fd, [view[start: start + self.row_bytes]], self.info.offset + row * self.row_bytes) \
                    != self.row_bytes:
                raise CheckpointError(f"{self.info.shard}: truncated while reading {self.name}")
        return out.view(self.dtype).view(len(ids), self.shape[1])

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _read_json(path: Path) -> dict[str, Any]:
    with open_regular(path, "file") as handle:
        raw = handle.read(MAX_HEADER_BYTES + 1)
    if len(raw) > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: larger than 100 MB, not a checkpoint's JSON file")
    data = parse_json(raw, path, "not valid JSON")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def resolve_model_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A local folder as is; a Hugging Face repo id from the local cache, else downloaded."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a folder (a checkpoint is a folder with config.json)")
        return path
    text = str(name_or_path)
    looks_like_repo = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_repo:
        raise CheckpointError(f"{path}: no such folder")
    return _from_hub(text)


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = DOWNLOAD_PATTERNS
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        raise CheckpointError(f"{repo_id}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        raise CheckpointError(
            f"{repo_id}: not a local folder, not in the Hugging Face cache, and the download failed "
            f"({type(exc).__name__}); check the name or the network"
        ) from None


def open_checkpoint(name_or_path: str | os.PathLike[str]) -> Checkpoint:
    return Checkpoint(resolve_model_path(name_or_path))
