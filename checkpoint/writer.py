"""Write a safetensors file as the safetensors library does, in large aligned writes.

A model's weights are served from the page cache the file leaves behind (a stored checkpoint is
mapped, not read: ``Checkpoint.map``), and Linux keeps a file's cached pages in folios as large
as the writes that made them allow. ``safetensors.torch.save_file`` writes tensor by tensor, at
unaligned offsets, so the cache held the file in small folios, which a mapping can only map in
4 KB pages; written in ``WRITE_BYTES`` pieces at multiples of that offset, it holds 2 MB folios
that a mapping advised ``MADV_HUGEPAGE`` maps whole, and stored 4-bit decode ran 1.16x faster
that way (docs/PERFORMANCE.md, "Weights in huge pages").
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from dsmoe.checkpoint.safetensors_header import DTYPE_BYTES

WRITE_BYTES = 8 * 2**20
"""The size of every write but the last, each at an offset that is a multiple of it."""

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}
_DTYPE_RANK = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
               "F64", "I64", "U64"]
"""The safetensors library's dtype order (its ``Dtype`` enum): it writes tensors by dtype, last
of this list first, then by name, so every tensor starts aligned to its element size."""


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """``tensors`` (CPU) and ``metadata`` to ``path``, the same bytes ``save_file`` writes."""
    names = {name: _DTYPE_NAMES[tensor.dtype] for name, tensor in tensors.items()}
    order = sorted(tensors, key=lambda name: (-_DTYPE_RANK.index(names[name]), name))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        nbytes = tensors[name].numel() * DTYPE_BYTES[names[name]]
        header[name] = {"dtype": names[name], "shape": list(tensors[name].shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the library pads the header to 8 bytes with spaces
    with open(path, "wb") as handle:
        buffer = bytearray(WRITE_BYTES)
        filled = 0

        def put(data: memoryview) -> None:
            nonlocal filled
            while len(data):
                taken = min(len(data), WRITE_BYTES - filled)
                buffer[filled:filled + taken] = data[:taken]
                filled, data = filled + taken, data[taken:]
                if filled == WRITE_BYTES:
                    handle.write(buffer)
                    filled = 0

        put(memoryview(struct.pack("<Q", len(text))))
        put(memoryview(text))
        for name in order:
            tensor = tensors[name].detach().contiguous().reshape(-1)
            if tensor.numel():
                put(tensor.view(torch.uint8).numpy().data)
        handle.write(memoryview(buffer)[:filled])
