"""The weights a token streams live in huge pages: stored files written so the page cache can map
them so, and weights made by the process placed in an arena of them."""

from __future__ import annotations

import filecmp
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import dsmoe
from dsmoe.checkpoint.huge_pages import HugePageArena, huge_page_bytes
from dsmoe.checkpoint.reader import Checkpoint, arena_bytes
from dsmoe.checkpoint.writer import WRITE_BYTES, write_safetensors
from dsmoe.model.deepseek import MoEGate
from dsmoe.quant import streamed_tensors


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


def test_a_written_checkpoint_is_mapped_in_huge_pages(tmp_path: Path, tiny_path: Path) -> None:
    """Written in large aligned pieces, a file stays in the page cache in 2 MB folios, which the
    reader's mapping (advised MADV_HUGEPAGE) maps whole."""
    page = huge_page_bytes()
    if page is None:
        pytest.skip("no transparent huge pages for memory that asks for them here")
    nbytes = 16 * page
    shutil.copy(tiny_path / "config.json", tmp_path / "config.json")
    write_safetensors(tmp_path / "model.safetensors", {"w": torch.randint(0, 255, (nbytes,), dtype=torch.uint8)})
    weight = Checkpoint(tmp_path).map("w")
    entry = _mapping_of(weight.data_ptr())
    assert "hg" in entry["VmFlags"].split()
    huge = int(entry["FilePmdMapped"].split()[0]) * 1024
    assert huge >= nbytes * 3 // 4, f"{huge} of {nbytes} bytes in huge pages"


def test_arena_blocks_are_aligned_and_in_huge_page_memory() -> None:
    page = huge_page_bytes()
    if page is None:
        pytest.skip("no transparent huge pages for memory that asks for them here")
    arena = HugePageArena(page, chunk_bytes=4 * page)
    blocks = [arena_bytes(arena, n) for n in (100, 3 * page, 2 * page, 5 * page)]
    for block, n in zip(blocks, (100, 3 * page, 2 * page, 5 * page)):
        assert block.numel() == n and block.data_ptr() % 64 == 0
        block.fill_(7)
    assert blocks[1].data_ptr() == blocks[0].data_ptr() + 128  # one after the other in a chunk
    assert blocks[2].data_ptr() % page == 0  # did not fit: the next chunk, from its first huge page
    entry = _mapping_of(blocks[3].data_ptr())  # larger than a chunk: one of its own
    assert "hg" in entry["VmFlags"].split() and int(entry["AnonHugePages"].split()[0]) * 1024 >= 4 * page
    assert all(int(b.sum()) == 7 * b.numel() for b in blocks)


def _streamed(model: torch.nn.Module) -> list[torch.Tensor]:
    return [t for m in model.modules() for t in ([m.weight] if isinstance(m, MoEGate) else streamed_tensors(m))]


@pytest.mark.parametrize("source", ["bf16, quantized while loading", "stored 4-bit", "stored 8-bit"])
def test_a_load_puts_every_streamed_weight_in_huge_page_memory(tiny_copy: Path, tmp_path: Path, source: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Quantized while loading (placed in the arena after), stored 4-bit (mapped, the mapping
    advised so) or stored 8-bit (read into the arena), every tensor a token reads whole lies in
    memory advised MADV_HUGEPAGE, and the numbers are a load's without huge pages."""
    if huge_page_bytes() is None:
        pytest.skip("no transparent huge pages for memory that asks for them here")
    path, bits = tiny_copy, 4
    if source.startswith("stored"):
        from dsmoe.loading import LoadOptions
        from dsmoe.quant.convert import quantize_checkpoint

        path, bits = tmp_path / "stored", int(source.split()[1][0])
        spec = LoadOptions(bits=bits, quantize_lm_head=True).quant_spec()
        assert spec is not None
        quantize_checkpoint(tiny_copy, path, spec, kernel_layout=True)  # what `dsmoe quantize` writes
    settings = {"bits": bits, "no_cache": True} if path == tiny_copy else {}
    model, _ = dsmoe.load(path, **settings)
    streamed = _streamed(model)
    assert len(streamed) > 10
    for tensor in streamed:
        assert not tensor.untyped_storage().resizable()  # not PyTorch's allocator's
        assert "hg" in _mapping_of(tensor.data_ptr())["VmFlags"].split()
    for module in ("huge_pages", "reader"):
        monkeypatch.setattr(f"dsmoe.checkpoint.{module}.huge_page_bytes", lambda: None)
    plain, _ = dsmoe.load(path, **settings)
    assert all(t.untyped_storage().resizable() or "hg" not in _mapping_of(t.data_ptr())["VmFlags"].split()
               for t in _streamed(plain))
    prompt = torch.tensor([[1, 5, 9, 2]])
    with torch.inference_mode():
        assert torch.equal(model(prompt), plain(prompt))
