"""A safetensors file's header, parsed and checked without torch.

The reader (``checkpoint.reader``) opens checkpoints with it; the console script's read-ahead
(``checkpoint.readahead``) orders its reads by it before torch is imported.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from io import BufferedReader
from typing import Any

from dsmoe.errors import CheckpointError

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    shard: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the shard
    nbytes: int


MAX_HEADER_BYTES = 100_000_000
"""The safetensors format's own cap on a header: a larger one is a corrupted or hostile file."""
INDEX_NAME = "model.safetensors.index.json"
"""A sharded checkpoint's map of tensor names to shard files (Hugging Face's name)."""


def open_regular(path: Path, what: str) -> BufferedReader:
    """Open for reading only a regular file: a FIFO or device named by a checkpoint would hang or stream."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} is missing") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path}: not a regular file")
    try:
        return path.open("rb")
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror})") from None


def header_bytes(path: Path) -> tuple[bytes, int]:
    """A safetensors file's JSON header and the file's size, with the header's length checked first."""
    with open_regular(path, "shard file") as handle:
        size = os.fstat(handle.fileno()).st_size
        if hasattr(os, "posix_fadvise"):
            # Only the header's pages: the kernel's read-ahead would put the data after it in the
            # page cache in small folios, and keep doing so ahead of a mapping's faults, where
            # those faults would have read 2 MB folios (checkpoint.huge_pages).
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise CheckpointError(f"{path}: truncated or corrupted safetensors file (header runs past the end)")
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: corrupted safetensors header ({header_len:,} bytes; the format allows 100 MB)")
        return handle.read(header_len), size


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header without reading its data.

    Every entry must have a known dtype, a shape of non-negative integers, and data offsets that
    fit the file, match the shape and overlap no other tensor's: a header that passes can only
    yield reads inside the file.
    """
    raw, size = header_bytes(path)
    header = parse_json(raw, path, "corrupted safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted safetensors header")
    header_len = len(raw)
    data_size = size - 8 - header_len
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise CheckpointError(f"{path}: corrupted header entry for tensor {name!r}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if (not isinstance(dtype, str) or not isinstance(shape, list) or not all(_is_count(d) for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)):
            raise CheckpointError(f"{path}: corrupted header entry for tensor {name!r}")
        begin, end = offsets
        numel = 1
        for dim in shape:
            numel *= dim
        if dtype not in DTYPE_BYTES or begin > end or end - begin != numel * DTYPE_BYTES[dtype]:
            raise CheckpointError(f"{path}: corrupted header entry for tensor {name!r}")
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated safetensors file (tensor {name!r} ends at byte {end}, data holds {data_size})"
            )
        infos[name] = TensorInfo(path, dtype, tuple(shape), 8 + header_len + begin, end - begin)
    previous: TensorInfo | None = None
    for info in sorted((i for i in infos.values() if i.nbytes), key=lambda i: i.offset):
        if previous is not None and info.offset < previous.offset + previous.nbytes:
            raise CheckpointError(f"{path}: corrupted safetensors header (tensors' data overlap)")
        previous = info
    return infos


def parse_json(raw: bytes | str, path: Path, problem: str) -> Any:
    """JSON from a file, any failure (bad syntax, bad UTF-8, nesting too deep) one CheckpointError."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: {problem} ({exc})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: {problem} (nested too deeply)") from None
