"""The quantized-checkpoint cache on the tiny fixture: the first --bits load writes it, the next
reads it without quantizing, and its logits are those of quantizing while loading, exactly. It
misses when the source changes, replaces what is damaged, survives a race and a full or
read-only disk, and --no-cache leaves nothing."""

from __future__ import annotations

import multiprocessing
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsmoe
from dsmoe.checkpoint.reader import Checkpoint
from dsmoe.cli.loading import cache_line
from dsmoe.errors import CheckpointError
from dsmoe.quant import QuantSpec, kernels
from dsmoe.quant.convert import quantize_checkpoint
from dsmoe.quant.spec import KERNEL_LAYOUT_KEY
from dsmoe.checkpoint.lazy import NATIVE_SCALES
from dsmoe.quant import cache as quant_cache
from dsmoe.quant import linear
from tests.cli_runner import run_cli

IDS = torch.tensor([[1, 5, 7, 9, 3, 2, 11]])


def entries() -> list[Path]:
    root = quant_cache.cache_root()
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.exists() else []


def forbid_quantizing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("quantized although a cached copy was there")
    monkeypatch.setattr(linear, "quantize_4bit_native", refuse)
    monkeypatch.setattr(linear, "quantize_int8_native", refuse)
    monkeypatch.setattr(linear, "quantize_int8", refuse)


@pytest.mark.parametrize("bits", [4, 8])
def test_first_load_writes_second_reads_with_the_same_logits(tiny_path: Path, bits: int,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    direct, _ = dsmoe.load(tiny_path, bits=bits, no_cache=True)
    assert direct.quant_cache is None and entries() == []
    first, _ = dsmoe.load(tiny_path, bits=bits)
    assert first.quant_cache is not None and first.quant_cache.action == "written"
    assert entries() == [first.quant_cache.path]
    forbid_quantizing(monkeypatch)
    second, _ = dsmoe.load(tiny_path, bits=bits)
    assert second.quant_cache is not None and second.quant_cache.action == "read"
    with torch.no_grad():
        expected = direct(IDS)
        assert torch.equal(first(IDS), expected)
        assert torch.equal(second(IDS), expected)


def test_an_entry_holds_4bit_weights_in_the_kernels_layout_and_a_load_maps_them(
        tiny_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels' layout is unpack_4bit's inverse of the stored nibbles (bitsandbytes' bytes, which
    the fixture's direct load quantizes to); the load takes those bytes by mapping, not reading."""
    direct, _ = dsmoe.load(tiny_path, bits=4, no_cache=True)
    entry = dsmoe.load(tiny_path, bits=4)[0].quant_cache.path
    stored = Checkpoint(entry)
    assert stored.config.quantization_config[KERNEL_LAYOUT_KEY] is True
    name = "model.layers.1.mlp.experts.3.up_proj"
    module = direct.get_submodule(name)
    assert module.layout == "native"  # the fixture's shapes take the native kernels
    assert torch.equal(stored.get(f"{name}.weight"), module.weight)
    assert torch.equal(stored.get(f"{name}.weight.{NATIVE_SCALES}"), module.runtime_absmax)
    read: list[str] = []
    populated: dict[str, bool] = {}
    original_get, original_map = Checkpoint.get, Checkpoint.map
    monkeypatch.setattr(Checkpoint, "get", lambda self, n: read.append(n) or original_get(self, n))

    def recording_map(self: Checkpoint, n: str, populate: bool = True) -> torch.Tensor:
        populated.setdefault(n, populate)
        return original_map(self, n, populate)

    monkeypatch.setattr(Checkpoint, "map", recording_map)
    mapped, _ = dsmoe.load(tiny_path, bits=4)
    native = [n for n in stored.tensor_names() if n.endswith(f".weight.{NATIVE_SCALES}")]
    mapped_names = {n[: -len(NATIVE_SCALES) - 1] for n in native} | set(native)
    absmax = {n[: -len(NATIVE_SCALES)] + "absmax" for n in native}
    assert len(native) > 0 and not set(read) & (mapped_names | absmax)
    assert all(populated[n] for n in mapped_names | {"lm_head.weight", "lm_head.weight.q6_steps"})
    # Read by a save or a dequantize only, a row a token: their pages are left to fault in.
    assert not any(populated[n] for n in absmax | {"model.embed_tokens.weight"})
    assert "model.layers.0.self_attn.q_proj.weight.quant_map" in read  # the rest is read as before
    with torch.no_grad():
        assert torch.equal(mapped(IDS), direct(IDS))
    assert torch.equal(mapped.model.embed_tokens.weight, direct.model.embed_tokens.weight)
    assert torch.equal(mapped.lm_head.weight, direct.lm_head.weight)
    # dequantized() reads the lazily mapped absmax
    assert torch.equal(mapped.get_submodule(name).dequantized(), module.dequantized())


def test_a_kernel_layout_entry_runs_where_the_native_kernels_do_not(tiny_path: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Without them, a kernel-layout weight goes back to bitsandbytes' layout and computes as a
    stored standard checkpoint does there."""
    entry = dsmoe.load(tiny_path, bits=4)[0].quant_cache.path
    standard = tmp_path / "standard"
    quantize_checkpoint(tiny_path, standard, QuantSpec(bits=4, quant_type="nf4", quantize_lm_head=True, lm_head="q6"))
    monkeypatch.setattr(kernels, "native_4bit_available", lambda: False)
    from_entry, _ = dsmoe.load(entry)
    from_standard, _ = dsmoe.load(standard)
    assert from_entry.get_submodule("model.layers.1.mlp.experts.3.up_proj").layout != "native"
    with torch.no_grad():
        assert torch.equal(from_entry(IDS), from_standard(IDS))


def test_a_kernel_layout_weight_of_the_wrong_shape_is_refused(tiny_path: Path, tmp_path: Path) -> None:
    entry = dsmoe.load(tiny_path, bits=4)[0].quant_cache.path
    broken = tmp_path / "broken"
    shutil.copytree(entry, broken)
    shard = next(broken.glob("*.safetensors"))
    tensors = load_file(shard)
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    tensors[name] = tensors[name].reshape(-1, 1)  # bitsandbytes' shape, not the kernels' [out, in / 2]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"up_proj.weight: the kernels' layout is uint8"):
        dsmoe.load(broken)


def test_key_covers_the_settings(tiny_path: Path) -> None:
    dsmoe.load(tiny_path, bits=4)
    dsmoe.load(tiny_path, bits=4, quant_type="fp4")
    dsmoe.load(tiny_path, bits=4, double_quant=True)
    dsmoe.load(tiny_path, bits=4, quantize_lm_head=False)
    dsmoe.load(tiny_path, bits=4, quantize_lm_head=True)  # a quantized lm_head (q6) is the default: bits=4's entry
    dsmoe.load(tiny_path, bits=8)
    dsmoe.load(tiny_path, bits=4, dtype="fp32")  # the compute dtype changes no stored byte: the same entry
    assert len(entries()) == 5


def test_a_changed_source_misses(tiny_copy: Path) -> None:
    first, _ = dsmoe.load(tiny_copy, bits=4)
    shard = sorted(tiny_copy.glob("model-*.safetensors"))[0]
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second, _ = dsmoe.load(tiny_copy, bits=4)
    assert second.quant_cache is not None and second.quant_cache.action == "written"
    assert second.quant_cache.path != first.quant_cache.path and len(entries()) == 2


@pytest.mark.parametrize("damage", ["truncated", "no_manifest", "unreadable"])
def test_a_damaged_entry_is_not_used_and_is_replaced(tiny_path: Path, damage: str) -> None:
    direct, _ = dsmoe.load(tiny_path, bits=4, no_cache=True)
    first, _ = dsmoe.load(tiny_path, bits=4)
    entry = first.quant_cache.path
    shard = sorted(entry.glob("model-*.safetensors"))[0]
    if damage == "truncated":  # a copy cut short
        shard.write_bytes(shard.read_bytes()[:1000])
    elif damage == "no_manifest":  # an entry some other tool left without its manifest
        (entry / quant_cache.MANIFEST).unlink()
    else:  # same size, garbage header: only reading it shows
        size = shard.stat().st_size
        shard.write_bytes(b"\xff" * size)
    again, _ = dsmoe.load(tiny_path, bits=4)
    if damage == "unreadable":
        assert again.quant_cache.action == "not_written" and "unreadable" in again.quant_cache.reason
        again, _ = dsmoe.load(tiny_path, bits=4)
    else:
        assert again.quant_cache.replaced
    assert again.quant_cache.action == "written" and quant_cache.is_complete(entry)
    with torch.no_grad():
        assert torch.equal(again(IDS), direct(IDS))


def _load_in_process(path: str, cache_dir: str) -> str:
    os.environ["DSMOE_CACHE"] = cache_dir
    model, _ = dsmoe.load(path, bits=4)
    return model.quant_cache.action


def test_two_processes_racing_leave_one_valid_entry(tiny_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        actions = pool.starmap(_load_in_process, [(str(tiny_path), os.environ["DSMOE_CACHE"])] * 2)
    assert all(a in ("written", "read", "not_written") for a in actions) and "written" in actions
    assert len(entries()) == 1 and quant_cache.is_complete(entries()[0])
    assert not [p for p in quant_cache.cache_root().iterdir() if p.name.startswith(".")]  # no staging left


def test_an_unwritable_cache_does_not_fail_the_load(tiny_path: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("DSMOE_CACHE", str(blocker))  # read-only for root too: a file where a folder must be
    model, _ = dsmoe.load(tiny_path, bits=4)
    assert model.quant_cache.action == "not_written" and "cannot create" in model.quant_cache.reason
    assert model(IDS).isfinite().all()
    assert cache_line(model.quant_cache).startswith("the quantized copy was not cached: cannot create")


def test_low_disk_space_refuses_to_write(tiny_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(quant_cache.shutil, "disk_usage",
                        lambda path: real(path)._replace(free=quant_cache.SPACE_MARGIN + 1000))
    model, _ = dsmoe.load(tiny_path, bits=4)
    assert model.quant_cache.action == "not_written" and "GB free" in model.quant_cache.reason
    assert entries() == []


def test_a_write_failure_midway_leaves_nothing(tiny_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("dsmoe.quant.convert.write_safetensors", full)
    model, _ = dsmoe.load(tiny_path, bits=4)
    assert model.quant_cache.action == "not_written" and "No space left" in model.quant_cache.reason
    assert list(quant_cache.cache_root().iterdir()) == []


def test_hub_snapshot_is_keyed_by_its_commit(tmp_path: Path) -> None:
    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    assert quant_cache.source_identity(snapshot) == {"hub": "models--org--name", "commit": "0123abc", "subfolder": ""}


def test_cli_says_where_and_no_cache_writes_nothing(tiny_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    command = ["generate", "--model", str(tiny_path), "--bits", "4", "--max-new-tokens", "2", "hi"]
    off = run_cli(capsys, *command, "--no-cache")
    assert off.code == 0, off.err
    assert entries() == [] and "quantized" not in off.err
    first = run_cli(capsys, *command)
    assert first.code == 0, first.err
    assert "quantized once into" in first.err and "later starts load it directly" in first.err
    second = run_cli(capsys, *command)
    assert second.code == 0 and "loaded the quantized copy in" in second.err


def test_no_cache_is_a_model_arg() -> None:
    assert dsmoe.LoadOptions.from_model_args({"bits": "4", "no_cache": "true"}).no_cache is True


def test_synthetic_weights_are_not_cached(capsys: pytest.CaptureFixture[str]) -> None:
    """``dsmoe bench --synthetic`` has no files to key a copy on: it quantizes in memory, writes nothing."""
    from tests.test_bench import SMALL

    result = run_cli(capsys, "bench", "--synthetic", SMALL, "--bits", "4", "--prompt-tokens", "4", "-n", "2", "--json")
    assert result.code == 0, result.err
    assert entries() == [] and "quantized" not in result.err


def test_an_expert_store_loads_from_the_cache_too(tiny_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    direct, _ = dsmoe.load(tiny_path, bits=4, expert_cache=1, no_cache=True)
    assert dsmoe.load(tiny_path, bits=4, expert_cache=1)[0].quant_cache.action == "written"
    forbid_quantizing(monkeypatch)
    cached, _ = dsmoe.load(tiny_path, bits=4, expert_cache=1)
    assert cached.quant_cache.action == "read"
    with torch.no_grad():
        assert torch.equal(cached(IDS), direct(IDS))
