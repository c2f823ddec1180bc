"""Routed experts read straight from the checkpoint's safetensors files with plain reads.

No memory map is kept: a mapped page that was touched counts in the process's RSS until the map
goes, so a store bounded by ``--max-ram`` reads each expert into memory it owns and drops it on
eviction.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dsmoe.errors import CheckpointError
from dsmoe.checkpoint.reader import Checkpoint
from dsmoe.model.deepseek import MLP
from dsmoe.quant import float_linear, linear_from_tensors, quantize_linear

_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(.+)$")
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class _Span:
    shard: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def _spans(shard: Path) -> dict[str, _Span]:
    """Absolute byte ranges of a shard's tensors (the header was validated when the checkpoint opened)."""
    with shard.open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
    spans = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{shard}: tensor {name!r} has dtype {entry['dtype']}, which dsmoe cannot offload")
        spans[name] = _Span(shard, 8 + header_len + begin, end - begin, dtype, tuple(entry["shape"]))
    return spans


class DiskExperts:
    """Builds one routed expert module from the checkpoint on each call, in memory of its own.

    ``quantize`` is the format to quantize floats into as they are read (``--bits`` at load);
    ``stored`` is the format of an already-quantized checkpoint. Either way the module is the one
    the loader would have built, so outputs match a fully loaded model.
    """

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype, quantize=None, stored=None) -> None:
        self.path = checkpoint.path
        self.dtype = dtype
        self.quantize = quantize
        self.stored = stored
        self.hidden = checkpoint.config.hidden_size
        self.intermediate = checkpoint.config.moe_intermediate_size
        spans: dict[str, _Span] = {}
        for shard in sorted({checkpoint.shard_of(n) for n in checkpoint.tensor_names() if _EXPERT.match(n)}):
            spans.update({n: s for n, s in _spans(shard).items() if _EXPERT.match(n)})
        self._spans: dict[tuple[int, int], dict[str, _Span]] = {}
        for name, span in spans.items():
            match = _EXPERT.match(name)
            assert match is not None
            key = (int(match.group(1)), int(match.group(2)))
            self._spans.setdefault(key, {})[name] = span
        # Opened up front: the prefetch thread and the main thread read concurrently.
        self._fds = {shard: os.open(shard, os.O_RDONLY) for shard in {s.shard for s in spans.values()}}

    def files(self) -> list[Path]:
        """The shards holding routed experts."""
        return sorted(self._fds)

    def keys(self) -> list[tuple[int, int]]:
        """Every (layer, expert) the checkpoint holds, in order."""
        return sorted(self._spans)

    def nbytes(self, layer: int, expert: int) -> int:
        """Bytes read from disk for this expert."""
        return sum(s.nbytes for s in self._spans_of(layer, expert).values())

    def _spans_of(self, layer: int, expert: int) -> dict[str, _Span]:
        try:
            return self._spans[(layer, expert)]
        except KeyError:
            raise CheckpointError(f"{self.path}: routed expert {expert} of layer {layer} is missing from the checkpoint") from None

    def _read(self, span: _Span) -> torch.Tensor:
        fd = self._fds[span.shard]
        # An anonymous mapping of its own, not the heap: unmapped as soon as the evicted expert's
        # tensors are freed, where malloc may keep freed heap pages and let RSS creep past the budget.
        buffer = mmap.mmap(-1, span.nbytes)
        view = memoryview(buffer)
        done = 0
        while done < span.nbytes:
            got = os.preadv(fd, [view[done:]], span.offset + done)
            if got == 0:
                raise CheckpointError(f"{span.shard}: file ended while reading an expert (was it truncated?)")
            done += got
        return torch.frombuffer(buffer, dtype=torch.uint8).view(span.dtype).reshape(span.shape)

    def build(self, layer: int, expert: int) -> nn.Module:
        """The expert as a module on the CPU, in the compute dtype (or quantized)."""
        spans = self._spans_of(layer, expert)
        prefix = f"model.layers.{layer}.mlp.experts.{expert}"
        with torch.device("meta"):
            module = MLP(self.hidden, self.intermediate)
        module.requires_grad_(False)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            name = f"{prefix}.{proj}"
            tensors = {n: self._read(s) for n, s in spans.items() if n.startswith(name + ".")}
            weight = tensors.get(f"{name}.weight")
            if weight is None:
                raise CheckpointError(f"{self.path}: tensor {name}.weight is missing from the checkpoint")
            if self.stored is not None and weight.dtype in (torch.uint8, torch.int8):
                setattr(module, proj, linear_from_tensors(tensors, name, self.stored, self.dtype, own=True))
            elif self.quantize is not None:
                setattr(module, proj, quantize_linear(weight, self.quantize, self.dtype))
            else:
                expected = (self.intermediate, self.hidden) if proj != "down_proj" else (self.hidden, self.intermediate)
                if tuple(weight.shape) != expected or not weight.is_floating_point():
                    raise CheckpointError(f"{self.path}: tensor {name}.weight is {weight.dtype} {list(weight.shape)}, "
                                          f"config.json implies floats {list(expected)}")
                setattr(module, proj, float_linear(weight.to(self.dtype)))
        return module

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
