"""The expert pack: the disk tier's experts in the kernels' layout, read into fixed slots.

The expected outputs are the fully resident model's (loaded without any store), token for token
and logit for logit; record sizes are computed by hand from the checkpoint's shapes.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from dsmoe import load
from dsmoe.checkpoint.reader import open_checkpoint
from dsmoe.errors import CheckpointError
from dsmoe.model.deepseek import RowEmbedding
from dsmoe.offload import Budgets, LayerCache, OffloadOptions, Resources, load_offloaded
from dsmoe.offload.pack import ALIGN, DATA, PackReader, read_manifest
from dsmoe.offload.plan import WORKSPACE, expert_sizes, resident_bytes
from dsmoe.offload.store import DiskSource, PackedSource
from dsmoe.perf.synthetic import SyntheticCheckpoint, save_checkpoint

ROOMY = Resources(gpu_free=None, ram_available=10**12, process_rss=0)
# Small enough to build in a second, wide enough for the native kernels (inputs in blocks of 64,
# outputs in tiles of 32): hidden 128, experts 64 wide, 8 routed experts a layer, top-2.
GEOMETRY = ("16b:layers=3,hidden_size=128,intermediate_size=256,moe_intermediate_size=64,n_routed_experts=8,"
            "num_experts_per_tok=2,vocab_size=512,num_attention_heads=4,num_key_value_heads=4")


@pytest.fixture(scope="module")
def small_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pack") / "small"
    save_checkpoint(SyntheticCheckpoint(GEOMETRY, seed=3), path)
    return path


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(1))


def budget_for(path: Path, bits: int, slots: int) -> float:
    """A --max-ram that leaves ``slots`` experts per layer in RAM (the plan's own arithmetic)."""
    config = open_checkpoint(path).config
    expert, _ = expert_sizes(config, torch.bfloat16, bits)
    rest = resident_bytes(config, torch.bfloat16, bits, None, embedding_in_file=True)
    return rest + 2 * expert + WORKSPACE + slots * expert * len(config.moe_layers) + 1


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("policy,prefetch", [("lru", False), ("lfu", True)])
def test_packed_disk_tier_equals_the_resident_model(small_path, prompt, bits, policy, prefetch):
    resident, _ = load(small_path, bits=bits, no_cache=True)
    want_steps = decode_logits(resident, prompt)
    with torch.inference_mode():
        want_logits = resident(prompt)
        want_ids = resident.generate(prompt, max_new_tokens=8)
    options = OffloadOptions(Budgets(max_ram=budget_for(small_path, bits, 3)), policy, prefetch)
    for attempt in ("written", "read"):
        model, _, store = load_offloaded(small_path, options, bits=bits, resources=ROOMY)
        asked = count_native_calls(store)
        assert isinstance(store.source, PackedSource)
        # The embedding table stays in the file: no parameter holds it.
        assert isinstance(model.model.embed_tokens, RowEmbedding)
        assert not any("embed_tokens" in name for name, _ in model.named_parameters())
        assert ("packed once into" if attempt == "written" else "read from the expert pack") in store.plan.notes[-1]
        with torch.inference_mode():
            assert torch.equal(model(prompt), want_logits)
            assert torch.equal(model.generate(prompt, max_new_tokens=8), want_ids)
        asked.clear()
        assert torch.equal(decode_logits(model, prompt), want_steps)
        assert len(asked) == 4 * len(store.plan.moe_layers)
        asked.clear()
        with torch.inference_mode():
            model.generate(prompt, max_new_tokens=8)
        # Each decode step after the first token ran natively, the store naming every MoE layer's experts.
        assert len(asked) == 7 * len(store.plan.moe_layers)
        assert store.plan.device_slots == 3 and store.stats.misses() > 0
        record = store.source.nbytes(1, 0)
        reads = store.stats.misses() + sum(layer.prefetched for layer in store.stats.layers.values())
        assert store.stats.link_bytes == {"disk->ram": reads * record}
        store.detach()


def decode_logits(model, prompt: torch.Tensor, steps: int = 4) -> torch.Tensor:
    """The logits of ``steps`` one-token decode steps after the prompt (the native path's input)."""
    cache = model.new_cache(1, prompt.shape[1] + steps)
    with torch.inference_mode():
        model(prompt, cache=cache)
        out = [model(torch.tensor([[7 + 11 * i]]), cache=cache) for i in range(steps)]
    return torch.cat(out, dim=1)


def count_native_calls(store) -> list[int]:
    """The layers the native decode step asked ``store`` for, in order."""
    asked: list[int] = []
    real = store.native_experts

    def native_experts(layer, x, ids):
        asked.append(layer)
        return real(layer, x, ids)

    store.native_experts = native_experts
    return asked


@pytest.mark.parametrize("bits", [4, 8])
def test_every_expert_in_a_slot_runs_the_resident_weights_natively(small_path, prompt, bits):
    """--expert-cache of all experts on the CPU: the slots are the loaded weights (no copy) and
    decode runs the native step through the store."""
    resident, _ = load(small_path, bits=bits, no_cache=True)
    with torch.inference_mode():
        want = resident.generate(prompt, max_new_tokens=6)
    model, _, store = load_offloaded(small_path, OffloadOptions(Budgets(expert_cache=8)), bits=bits, resources=ROOMY)
    asked = count_native_calls(store)
    assert torch.equal(decode_logits(model, prompt), decode_logits(resident, prompt))
    asked.clear()
    with torch.inference_mode():
        assert torch.equal(model.generate(prompt, max_new_tokens=6), want)
    assert len(asked) == 5 * len(store.plan.moe_layers) and store.stats.misses() == 0
    assert store.stats.link_bytes == {}  # nothing was copied
    store.detach()


def test_record_size_is_the_kernels_bytes_rounded_to_the_alignment(small_path):
    # 4-bit: per projection the nibbles (64 x 128 / 2 = 4096 bytes), fp32 scales per block of 64
    # (8192 / 64 x 4 = 512 bytes), the 16-entry codebook (64 bytes) and the kernel's bf16 scales
    # (128 x 2 = 256): 3 x 4928 = 14784, one record of 16384 bytes (4 KiB aligned). 8-bit: int8
    # weights (8192), the fp32 SCB and scale a row (64 x 4 or 128 x 4 each, padded to 64 bytes):
    # 3 x 8192 + 2 x (256 + 256 + 512) = 26624 -> 28672.
    want = {4: 16384, 8: 28672}
    for bits, size in want.items():
        _, _, store = load_offloaded(small_path, OffloadOptions(Budgets(max_ram=budget_for(small_path, bits, 2))),
                                     bits=bits, resources=ROOMY)
        assert store.source.nbytes(1, 0) == size and size % ALIGN == 0
        store.detach()


def test_a_truncated_pack_is_not_used_and_is_written_again(small_path, prompt):
    options = OffloadOptions(Budgets(max_ram=budget_for(small_path, 4, 2)))
    _, _, store = load_offloaded(small_path, options, bits=4, resources=ROOMY)
    entry = store.source.slots.reader.entry
    store.detach()
    with open(entry / DATA, "r+b") as handle:
        handle.truncate(ALIGN)
    assert read_manifest(entry) is None
    with pytest.raises(CheckpointError, match="not a complete expert pack"):
        PackReader(entry)
    resident, _ = load(small_path, bits=4, no_cache=True)
    model, _, again = load_offloaded(small_path, options, bits=4, resources=ROOMY)
    assert isinstance(again.source, PackedSource) and "packed once into" in again.plan.notes[-1]
    assert read_manifest(entry) is not None
    with torch.inference_mode():
        assert torch.equal(model(prompt), resident(prompt))
    again.detach()


def test_no_cache_reads_the_checkpoint_files(small_path, prompt):
    options = OffloadOptions(Budgets(max_ram=budget_for(small_path, 4, 2)), disk_cache=False)
    _, _, store = load_offloaded(small_path, options, bits=4, resources=ROOMY)
    assert isinstance(store.source, DiskSource) and "--no-cache" in store.plan.notes[-1]
    store.detach()


def test_buffered_reads_where_direct_io_is_refused(small_path, monkeypatch, prompt):
    """A filesystem that opens with O_DIRECT but refuses the reads (EINVAL): buffered from then on,
    with the same output."""
    resident, _ = load(small_path, bits=8, no_cache=True)
    options = OffloadOptions(Budgets(max_ram=budget_for(small_path, 8, 2)))
    model, _, store = load_offloaded(small_path, options, bits=8, resources=ROOMY)
    reader = store.source.slots.reader
    assert reader.direct and "direct reads: yes" in store.plan.notes[-1]
    real = os.preadv
    refused = []

    def preadv(fd, buffers, offset):
        if fd == reader.direct_fd:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    with torch.inference_mode():
        assert torch.equal(model(prompt), resident(prompt))
    assert len(refused) == 1 and not reader.direct and store.stats.misses() > 1
    store.detach()


def test_serving_a_pass_keeps_all_its_experts_until_they_run():
    # LFU, 3 slots, resident {0 (used 3x), 1 (1x), 2 (1x)}; a pass needs {1, 5, 6}. Serving 5 evicts
    # the least used of {0, 2} (1 is held): 2. Serving 6 must not evict 1 or 5 (held, used once),
    # although 0 is used most: it goes.
    cache = LayerCache(3, "lfu")
    for expert in (0, 0, 0, 1, 2):
        cache.access(expert)
    served = cache.serve([1, 5, 6])
    assert served == [(1, True, []), (5, False, [2]), (6, False, [0])]
    assert cache.resident == {1, 5, 6}
    with pytest.raises(ValueError):
        cache.serve([1, 2, 3, 4])


def test_table_rows_are_the_stored_rows(small_path):
    checkpoint = open_checkpoint(small_path)
    table = checkpoint.get("model.embed_tokens.weight")
    rows = checkpoint.rows("model.embed_tokens.weight")
    assert torch.equal(rows.get([5, 0, 511, 5]), table[[5, 0, 511, 5]])
    with pytest.raises(IndexError):
        rows.get([512])
    rows.close()


def test_a_prompt_bigger_than_the_slots_reads_its_next_experts_ahead(small_path, prompt):
    """A prefill pass needing more experts than a layer's slots: reads start ahead of use (on the
    reader threads), each counted once as a miss, and the logits are the resident model's."""
    resident, _ = load(small_path, bits=4, no_cache=True)
    model, _, store = load_offloaded(small_path, OffloadOptions(Budgets(max_ram=budget_for(small_path, 4, 2))),
                                     bits=4, resources=ROOMY)
    fills: list[bool] = []
    real = store.fill

    def fill(layer, expert, ahead):
        fills.append(ahead)
        real(layer, expert, ahead)

    store.fill = fill
    tokens = torch.arange(0, 512, 16).view(1, -1)  # 32 tokens: every layer routes to most of its 8 experts
    with torch.inference_mode():
        assert torch.equal(model(tokens), resident(tokens))
    prefetched = sum(layer.prefetched for layer in store.stats.layers.values())  # the next layer's guesses
    assert fills.count(True) > prefetched and len(fills) == store.stats.misses() + prefetched
    assert store.stats.link_bytes["disk->ram"] == len(fills) * store.source.nbytes(1, 0)
    store.detach()


def test_bench_reports_the_tiers_read_speed_beside_the_disks(small_path):
    from dsmoe.perf.runner import run_benchmark

    model, _, store = load_offloaded(small_path, OffloadOptions(Budgets(max_ram=budget_for(small_path, 4, 2))),
                                     bits=4, resources=ROOMY)
    result = run_benchmark(model, "small", 4, 0.0, prompt_tokens=16, new_tokens=4, store=store)
    assert set(result.link_bytes_per_s or {}) == {"disk->ram"} and result.link_bytes_per_s["disk->ram"] > 0
    assert result.disk_probe_bytes_per_s is not None and result.disk_probe_bytes_per_s > 0
    assert store.source.files() == [store.source.slots.reader.entry / DATA]
    resident, _ = load(small_path, bits=4, no_cache=True)
    plain = run_benchmark(resident, "small", 4, 0.0, prompt_tokens=16, new_tokens=4)
    assert plain.link_bytes_per_s is None and plain.disk_probe_bytes_per_s is None
    store.detach()


def test_a_killed_writers_staging_folder_is_cleared(small_path):
    """A writer that died mid-pack leaves its staging folder; the next writer removes it."""
    import shutil

    options = OffloadOptions(Budgets(max_ram=budget_for(small_path, 8, 2)))
    _, _, store = load_offloaded(small_path, options, bits=8, resources=ROOMY)
    entry = store.source.slots.reader.entry
    store.detach()
    stale = entry.with_name(f".{entry.name}.staging-{_finished_pid()}-1")
    stale.mkdir()
    (stale / DATA).write_bytes(b"partial")
    shutil.rmtree(entry)
    _, _, again = load_offloaded(small_path, options, bits=8, resources=ROOMY)
    assert not stale.exists() and read_manifest(entry) is not None
    again.detach()


def _finished_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _file_mappings(path: Path) -> list[tuple[int, int]]:
    """The address ranges this process maps from files under ``path`` (/proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(str(path)):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def test_an_offloaded_load_holds_its_resident_weights_itself_rather_than_mapping_them(small_path, prompt, tmp_path):
    """Mapped file pages are what a memory cap reclaims first: an offloaded run would read its
    attention weights from disk again every token. A plain load maps them (nothing copied)."""
    from dsmoe.quant.convert import quantize_checkpoint
    from dsmoe.quant.spec import QuantSpec

    stored = tmp_path / "kernel-layout"
    quantize_checkpoint(small_path, stored, QuantSpec(bits=4), kernel_layout=True)
    weight = "model.layers.1.self_attn.q_proj"

    def mapped(model: torch.nn.Module) -> bool:
        address = model.get_submodule(weight).weight.data_ptr()
        return any(start <= address < end for start, end in _file_mappings(stored))

    plain, _ = load(stored)
    assert mapped(plain)
    with torch.inference_mode():
        want = plain(prompt)
    del plain
    model, _, store = load_offloaded(stored, OffloadOptions(Budgets(max_ram=budget_for(stored, 4, 3))), resources=ROOMY)
    assert store.plan.on_disk and not mapped(model)
    with torch.inference_mode():
        assert torch.equal(model(prompt), want)
