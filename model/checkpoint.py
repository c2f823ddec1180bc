"""Read a checkpoint folder lazily: config, shard index, and tensors one at a time.

Every shard's header is checked up front against its file size, so a truncated or corrupted
download fails at open with the file named, not halfway through loading.

Tensors are read with positioned reads into fresh memory rather than returned as views of a
memory map: the file's pages stay in the page cache (not the process's RSS), and the process
holds exactly the tensors it keeps. Loading 33 GB of bf16 into a 9 GB 4-bit model therefore
peaks near 9 GB of RSS, not near the size of the shards it read.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import torch

from dsmoe.errors import CheckpointError
from dsmoe.model.config import DeepseekConfig

INDEX_NAME = "model.safetensors.index.json"
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
_DTYPE_BYTES = {
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


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header without reading its data."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise CheckpointError(f"{path}: truncated or corrupted safetensors file (header runs past the end)")
            header = json.loads(handle.read(header_len))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: shard file is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupted safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted safetensors header")
    data_size = size - 8 - header_len
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupted header entry for tensor {name!r}") from None
        numel = 1
        for dim in shape:
            numel *= dim
        if dtype not in _DTYPE_BYTES or end - begin != numel * _DTYPE_BYTES[dtype]:
            raise CheckpointError(f"{path}: corrupted header entry for tensor {name!r}")
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated safetensors file (tensor {name!r} ends at byte {end}, data holds {data_size})"
            )
        infos[name] = TensorInfo(path, dtype, shape, 8 + header_len + begin, end - begin)
    return infos


class Checkpoint:
    """A checkpoint folder in the official Hugging Face layout, read lazily."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.raw_config: dict[str, Any] = _read_json(path / "config.json")
        self.config = DeepseekConfig.from_dict(self.raw_config, source=str(path / "config.json"))
        self._tensors = self._index()
        self._handles: dict[Path, BinaryIO] = {}

    def _index(self) -> dict[str, TensorInfo]:
        index_path = self.path / INDEX_NAME
        if index_path.exists():
            index = _read_json(index_path)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: no weight_map")
            shards = sorted(set(weight_map.values()))
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
        if handle.readinto(raw.numpy()) != info.nbytes:
            raise CheckpointError(f"{info.shard}: truncated while reading tensor {name!r}")
        return raw.view(_TORCH_DTYPES[info.dtype]).reshape(info.shape)

    def iter_tensors(self, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Tensors in shard order, so each shard's pages are read once, front to back."""
        chosen = names if names is not None else self.tensor_names()
        for name in sorted(chosen, key=lambda n: (self._info(n).shard.name, n)):
            yield name, self.get(name)

    def tokenizer_files(self) -> list[Path]:
        return [self.path / name for name in TOKENIZER_FILES if (self.path / name).exists()]

    def total_bytes(self) -> int:
        return sum(self.nbytes(n) for n in self._tensors)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
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
