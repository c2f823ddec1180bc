"""The console script reads a model's files ahead before importing torch, and only when it should."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsmoe.checkpoint import readahead
from dsmoe.cli.entry import model_to_read_ahead


def _folder(tmp_path: Path, quantized: bool = False) -> Path:
    folder = tmp_path / ("quantized" if quantized else "model")
    folder.mkdir()
    config = {"model_type": "deepseek"} | ({"quantization_config": {"load_in_4bit": True}} if quantized else {})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_which_command_lines_read_ahead(tmp_path: Path) -> None:
    plain = _folder(tmp_path)
    m = str(plain)
    assert model_to_read_ahead(["generate", "hi", "-m", m]) == plain
    assert model_to_read_ahead(["--debug", "bench", f"--model={m}"]) == plain
    assert model_to_read_ahead(["chat", "--model", m, "--bits", "16"]) == plain
    assert model_to_read_ahead(["info", m, "-m", m]) is None  # reads the header only
    assert model_to_read_ahead(["quantize", m, str(tmp_path / "out")]) is None  # streams its source
    assert model_to_read_ahead(["generate", "hi", "-m", m, "--max-ram", "4"]) is None  # offloaded
    assert model_to_read_ahead(["generate", "hi", "-m", m, "--expert-cache=8"]) is None
    assert model_to_read_ahead(["generate", "hi", "-m", m, "--bits", "4"]) is None  # the cache or a conversion
    assert model_to_read_ahead(["generate", "hi", "-m", str(tmp_path / "absent")]) is None
    assert model_to_read_ahead(["generate", "hi"]) is None  # the bundled demo model
    stored = _folder(tmp_path, quantized=True)
    assert model_to_read_ahead(["generate", "hi", "-m", str(stored), "--bits=4"]) == stored


def test_a_bits_run_of_a_float_checkpoint_reads_ahead_the_cache_entry_it_will_load(tiny_copy: Path) -> None:
    import dsmoe

    m = str(tiny_copy)
    run = ["generate", "hi", "-m", m, "--bits", "4"]
    assert model_to_read_ahead(run) is None  # no entry yet: the run converts as it reads
    model, _ = dsmoe.load(tiny_copy, bits=4)
    assert model.quant_cache is not None and model.quant_cache.action == "written"
    assert model_to_read_ahead(run) == model.quant_cache.path
    assert model_to_read_ahead(["chat", f"--model={m}", "--bits=4"]) == model.quant_cache.path
    assert model_to_read_ahead(["generate", "hi", "-m", m, "--bits", "8"]) is None  # no 8-bit entry
    assert model_to_read_ahead(run + ["--quant-type", "fp4"]) is None  # another entry, or none
    assert model_to_read_ahead(run + ["--no-cache"]) is None
    (tiny_copy / "config.json").touch()  # the source changed: its old entry is not what a run loads
    assert model_to_read_ahead(run) is None
    model, _ = dsmoe.load(tiny_copy, bits=4)
    second, _ = dsmoe.load(tiny_copy, bits=4, lm_head="int8")
    assert second.quant_cache is not None and second.quant_cache.path != model.quant_cache.path
    assert model_to_read_ahead(run) is None  # two 4-bit entries: which one depends on flags


def test_the_read_ahead_module_and_the_entry_do_not_import_torch() -> None:
    code = "import sys, dsmoe.cli.entry; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_each_file_is_advised_front_to_back_and_a_model_too_large_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _folder(tmp_path)
    sizes = {"model-00001-of-00002.safetensors": 3 * readahead.ADVICE_BYTES // 2, "model-00002-of-00002.safetensors": 10}
    for name, size in sizes.items():
        with open(folder / name, "wb") as f:
            f.truncate(size)
    calls: list[tuple[str, int, int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: calls.append(
        (Path(os.readlink(f"/proc/self/fd/{fd}")).name, offset, length, advice)))
    monkeypatch.setattr(readahead, "available_memory", lambda: (10 * readahead.ADVICE_BYTES, "MemAvailable"))
    monkeypatch.setattr(readahead, "advice_span", lambda path: readahead.ADVICE_BYTES)
    thread = readahead.start_read_ahead(folder)
    assert thread is not None
    thread.join(10)
    will = os.POSIX_FADV_WILLNEED
    first, second = sizes
    assert [call for call in calls if call[3] == will] == [(first, 0, readahead.ADVICE_BYTES, will),
                     (first, readahead.ADVICE_BYTES, readahead.ADVICE_BYTES // 2, will), (second, 0, 10, will)]
    calls.clear()
    # 1.5 spans + 10 bytes is more than half of 3 spans: not read ahead.
    monkeypatch.setattr(readahead, "available_memory", lambda: (3 * readahead.ADVICE_BYTES, "memory cgroup limit"))
    assert readahead.start_read_ahead(folder) is None and calls == []


def test_tensors_are_advised_in_the_loaders_order_with_layer_numbers_as_numbers(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    import torch

    path = tmp_path / "model.safetensors"
    tensors = {"model.layers.10.w": torch.zeros(300, dtype=torch.uint8), "model.layers.2.w": torch.zeros(200, dtype=torch.uint8),
               "model.embed_tokens.weight": torch.zeros(100, dtype=torch.uint8)}
    save_file(tensors, str(path))
    order = readahead.load_order([path])
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    # The file holds them by name (embed, layers.10, layers.2), each of its own size, after the header.
    assert [end - start for _, start, end in order] == [100, 200, 300]
    assert min(start for _, start, _ in order) == header and max(end for *_, end in order) == path.stat().st_size
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    assert readahead.load_order([garbage]) == [(garbage, 0, 64)]


def test_a_stored_quantized_checkpoint_is_advised_without_what_a_load_maps_unread(tmp_path: Path) -> None:
    """The embedding, and an absmax beside kernel scales (``native_scales``), are mapped with their
    pages left to fault in: reading them ahead would spend the disk on bytes no one reads."""
    from safetensors.torch import save_file
    import torch

    path = tmp_path / "model.safetensors"
    sizes = {"model.embed_tokens.weight": 100, "a.weight": 10, "a.weight.absmax": 20, "a.weight.native_scales": 30,
             "b.weight": 40, "b.weight.absmax": 50}  # b: bitsandbytes' layout, its absmax is what it runs with
    save_file({name: torch.zeros(n, dtype=torch.uint8) for name, n in sizes.items()}, str(path))
    assert sorted(end - start for _, start, end in readahead.load_order([path])) == sorted(sizes.values())
    assert sorted(end - start for _, start, end in readahead.load_order([path], stored_quantized=True)) == [10, 30, 40, 50]


def test_a_call_spans_what_the_device_reads_of_one_call(tmp_path: Path) -> None:
    """The larger of read_ahead_kb and max_sectors_kb, from the disk's queue (a partition's parent)."""
    data = tmp_path / "model.safetensors"
    data.write_bytes(b"x")
    device = os.stat(data).st_dev
    disk = tmp_path / "root/sys/devices/vda"
    for name, kib in (("read_ahead_kb", "128"), ("max_sectors_kb", "1280")):
        (disk / "queue").mkdir(parents=True, exist_ok=True)
        (disk / "queue" / name).write_text(kib + "\n")
    (disk / "vda1").mkdir()
    (tmp_path / "root/sys/dev/block").mkdir(parents=True)
    link = tmp_path / f"root/sys/dev/block/{os.major(device)}:{os.minor(device)}"
    link.symlink_to(disk / "vda1")  # a partition: no queue of its own
    assert readahead.advice_span(data, tmp_path / "root") == 1280 * 1024
    link.unlink()
    link.symlink_to(disk)
    (disk / "queue" / "read_ahead_kb").write_text("8192\n")
    assert readahead.advice_span(data, tmp_path / "root") == 8192 * 1024
    assert readahead.advice_span(data, tmp_path / "nowhere") == readahead.ADVICE_BYTES


def _resident_pages(path: Path) -> tuple[int, int]:
    """(pages of ``path`` in the page cache, pages it has): mincore over a mapping of it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "rb") as f:
        base = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
    assert base is not None and base != ctypes.c_void_p(-1).value, os.strerror(ctypes.get_errno())
    try:
        vec = (ctypes.c_ubyte * pages)()
        assert libc.mincore(base, size, vec) == 0, os.strerror(ctypes.get_errno())
    finally:
        libc.munmap(base, size)
    return sum(v & 1 for v in vec), pages


def _dropped_file(path: Path, nbytes: int) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(nbytes))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    cached, pages = _resident_pages(path)
    if cached > pages // 2:
        pytest.skip("this filesystem keeps a file's pages when told to drop them (tmpfs)")


@pytest.mark.parametrize("stored_quantized", [False, True])  # advised, or faulted in through a mapping
def test_a_file_dropped_from_the_page_cache_is_back_in_it_after_the_read_ahead(tmp_path: Path,
                                                                             stored_quantized: bool) -> None:
    path = tmp_path / "model.safetensors"
    _dropped_file(path, 32 * 2**20)  # more than one call of the kernel's read-ahead clamp (8 MiB here)
    readahead.read_into_cache([path], stored_quantized)
    deadline = time.monotonic() + 10
    while _resident_pages(path)[0] < _resident_pages(path)[1] and time.monotonic() < deadline:
        time.sleep(0.01)
    cached, pages = _resident_pages(path)
    assert cached == pages


def _huge_mapped_bytes(path: Path) -> int:
    """How much of a fresh mapping of ``path``, all of it faulted in, Linux maps in huge pages."""
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE)
        bytes(mapping[::mmap.PAGESIZE])  # one byte a page: every page faulted in
        smaps = Path("/proc/self/smaps").read_text().split("\n")
        start = next(i for i, line in enumerate(smaps) if line.endswith(str(path)))
        field = next(line for line in smaps[start + 1:] if line.startswith("FilePmdMapped:"))
        return int(field.split()[1]) * 1024
    finally:
        mapping.close()


def test_the_read_ahead_leaves_a_file_in_pages_a_mapping_takes_in_huge_pages(tmp_path: Path) -> None:
    """Read ahead through a mapping advised MADV_HUGEPAGE, a file's pages land in 2 MB folios; by
    POSIX_FADV_WILLNEED, in small ones, which a mapping can take only in 4 KB pages."""
    page = readahead.huge_page_bytes()
    if page is None:
        pytest.skip("no transparent huge pages for memory that asks for them here")
    path = tmp_path / "model.safetensors"
    size = 16 * page
    _dropped_file(path, size)
    readahead.advise_will_need([path])
    deadline = time.monotonic() + 10
    while _resident_pages(path)[0] < size // mmap.PAGESIZE and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _huge_mapped_bytes(path) <= size // 4
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    readahead.read_into_cache([path], stored_quantized=True)
    assert _huge_mapped_bytes(path) >= size * 3 // 4  # all of it but for pages the kernel found no room for


def test_the_read_ahead_leaves_cached_pages_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A warm start maps nothing: the pages are in the cache already, in whatever folios."""
    if readahead.huge_page_bytes() is None:
        pytest.skip("no transparent huge pages for memory that asks for them here")
    path = tmp_path / "model.safetensors"
    _dropped_file(path, 8 * 2**20)
    calls: list[int] = []
    monkeypatch.setattr(readahead, "advise", lambda address, nbytes, advice: calls.append(advice) or True)
    readahead.read_into_cache([path], stored_quantized=True)
    assert calls == [readahead.MADV_POPULATE_READ, readahead.MADV_DONTNEED]  # cold: its 4 huge pages, one run
    path.read_bytes()  # now all cached
    calls.clear()
    readahead.read_into_cache([path], stored_quantized=True)
    assert calls == []


def test_huge_page_runs_take_each_page_once_and_join_neighbours() -> None:
    a, b = Path("a"), Path("b")
    ranges = [(a, 10, 20), (a, 150, 250), (a, 5, 99), (b, 0, 1), (a, 300, 301), (a, 400, 401)]
    # pages of 100 bytes: a's 0, then 1 and 2 (joined to it), 0 again (taken), b's 0, a's 3 (a run
    # of its own after b's), 4 (joined to it)
    assert readahead.huge_page_runs(ranges, 100) == [(a, 0, 300), (b, 0, 100), (a, 300, 500)]
