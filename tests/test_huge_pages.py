"""A stored checkpoint's weights are mapped in huge pages: dsmoe writes its files so that the page
cache holds them in 2 MB folios, the same bytes the safetensors library writes."""

from __future__ import annotations

import filecmp
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dsmoe.checkpoint.huge_pages import huge_page_bytes
from dsmoe.checkpoint.reader import Checkpoint
from dsmoe.checkpoint.writer import WRITE_BYTES, write_safetensors


def _mapping_of(address: int) -> dict[str, str]:
    """The /proc/self/smaps entry of the mapping holding ``address``: its fields, and "VmFlags"."""
    entry: dict[str, str] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's first line: start-end perms offset ...
            start, end = (int(x, 16) for x in head.split("-"))
            if entry is not None:
                return entry
            entry = {} if start <= address < end else None
        elif entry is not None:
            key, _, value = line.partition(":")
            entry[key] = value.strip()
    assert entry is not None, f"no mapping holds {address:#x}"
    return entry


def test_the_writer_writes_what_safetensors_writes(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16,
              torch.uint32, torch.uint64]
    tensors = {f"model.layers.{i}.w": torch.randint(0, 100, (3, 5 + i), generator=generator).to(dtype)
               for i, dtype in enumerate(dtypes)}
    tensors |= {"empty": torch.zeros(0, 4), "scalar": torch.tensor(3.5), "naïve": torch.ones(2),
                "transposed": torch.arange(12.0).reshape(3, 4).t(),  # not contiguous: written as its values
                "large": torch.randint(0, 255, (WRITE_BYTES + 12345,), dtype=torch.uint8, generator=generator)}
    for metadata in ({"format": "pt"}, None):
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "theirs.safetensors"), metadata=metadata)
        write_safetensors(tmp_path / "ours.safetensors", tensors, metadata)
        assert filecmp.cmp(tmp_path / "theirs.safetensors", tmp_path / "ours.safetensors", shallow=False)


@pytest.mark.parametrize("how", ["written by dsmoe", "not cached, faulted in by the load"])
def test_a_stored_checkpoint_is_mapped_in_huge_pages(tmp_path: Path, tiny_path: Path, how: str) -> None:
    """Written in large aligned pieces, a file stays in the page cache in 2 MB folios; one that is
    not cached (here written by save_file, in small folios, then dropped) is read in 2 MB folios by
    the faults of the reader's mapping, advised MADV_HUGEPAGE. Either way the mapping maps it
    whole in huge pages."""
    page = huge_page_bytes()
    if page is None:
        pytest.skip("no transparent huge pages for memory that asks for them here")
    nbytes = 16 * page
    shutil.copy(tiny_path / "config.json", tmp_path / "config.json")
    tensors = {"w": torch.randint(0, 255, (nbytes,), dtype=torch.uint8)}
    path = tmp_path / "model.safetensors"
    if how == "written by dsmoe":
        write_safetensors(path, tensors)
    else:
        save_file(tensors, str(path))
        with open(path, "rb") as f:
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    weight = Checkpoint(tmp_path).map("w")
    entry = _mapping_of(weight.data_ptr())
    assert "hg" in entry["VmFlags"].split()
    huge = int(entry["FilePmdMapped"].split()[0]) * 1024
    assert huge >= nbytes * 3 // 4, f"{huge} of {nbytes} bytes in huge pages"


def test_a_tensor_mapped_lazily_is_not_in_huge_pages(tmp_path: Path, tiny_path: Path) -> None:
    """A lazily mapped table is read a row at a time (the embedding's): in a mapping advised
    MADV_HUGEPAGE, each row's fault would read 2 MB from the disk; a weight beside it stays advised."""
    page = huge_page_bytes()
    if page is None:
        pytest.skip("no transparent huge pages for memory that asks for them here")
    shutil.copy(tiny_path / "config.json", tmp_path / "config.json")
    write_safetensors(tmp_path / "model.safetensors", {"table": torch.zeros(4 * page, dtype=torch.uint8),
                                                      "weight": torch.zeros(4 * page, dtype=torch.int8)})
    checkpoint = Checkpoint(tmp_path)
    table, weight = checkpoint.map("table", populate=False), checkpoint.map("weight")
    assert "nh" in _mapping_of(table.data_ptr() + page)["VmFlags"].split()
    assert "hg" in _mapping_of(weight.data_ptr() + page)["VmFlags"].split()
