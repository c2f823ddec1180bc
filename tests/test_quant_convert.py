"""quantize_checkpoint: a complete folder in transformers' layout, or nothing at all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dsmoe.errors import CheckpointError, UsageError
from dsmoe.quant import QuantSpec, linear_from_tensors, should_quantize, spec_from_config
from dsmoe.quant.convert import quantize_checkpoint

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "tiny-deepseek"
NF4 = QuantSpec(bits=4, quant_type="nf4")

pytestmark = [pytest.mark.skipif(not FIXTURE.is_dir(), reason="tiny-deepseek fixture not present"),
              pytest.mark.threads(1)]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    copy = tmp_path / "src"
    shutil.copytree(FIXTURE, copy)
    for path in copy.iterdir():
        path.chmod(0o644)
    return copy


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "src")


def _all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


@pytest.mark.parametrize("spec", [NF4, QuantSpec(bits=4, quant_type="fp4", double_quant=True),
                                  QuantSpec(bits=8, quant_type="int8")], ids=lambda s: s.name)
def test_conversion_writes_transformers_layout(src: Path, tmp_path: Path, spec: QuantSpec) -> None:
    seen: list[tuple[int, int]] = []
    dst = tmp_path / "out"
    report = quantize_checkpoint(src, dst, spec, progress=lambda done, total: seen.append((done, total)),
                                 shard_bytes=150_000)
    assert _leftovers(tmp_path) == ["out"]
    assert report.shards == len(list(dst.glob("model-*-of-*.safetensors"))) > 1
    assert seen[-1][0] == seen[-1][1] == report.bytes_in and report.bytes_out < report.bytes_in
    assert report.peak_rss_bytes > 0 and report.seconds > 0
    config = json.loads((dst / "config.json").read_text())
    assert spec_from_config(config["quantization_config"]) == spec
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in dst.iterdir()}
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    tensors = _all_tensors(dst)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    source = _all_tensors(FIXTURE)
    for name, original in source.items():
        if should_quantize(name, spec):
            prefix = name[: -len(".weight")]
            group = {k: v for k, v in tensors.items() if k.startswith(prefix + ".")}
            module = linear_from_tensors(group, prefix, spec, torch.float32)
            err = (module.dequantized() - original.float()).norm() / original.float().norm()
            assert err < (0.02 if spec.bits == 8 else 0.2), name
        else:
            assert torch.equal(tensors[name], original), name  # floats are copied as stored
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
    assert "lm_head.SCB" not in tensors and "lm_head.weight.absmax" not in tensors


def test_lm_head_option_stores_int8(src: Path, tmp_path: Path) -> None:
    spec = QuantSpec(bits=4, quant_type="nf4", quantize_lm_head=True)
    quantize_checkpoint(src, tmp_path / "out", spec)
    tensors = _all_tensors(tmp_path / "out")
    assert tensors["lm_head.weight"].dtype == torch.int8 and "lm_head.SCB" in tensors


def test_interrupt_leaves_nothing(src: Path, tmp_path: Path) -> None:
    calls = []

    def interrupt(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 40:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(src, tmp_path / "out", NF4, progress=interrupt, shard_bytes=100_000)
    assert _leftovers(tmp_path) == []


def test_failure_keeps_the_old_destination(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    quantize_checkpoint(src, dst, NF4)
    before = sorted(p.name for p in dst.iterdir())

    def fail(done: int, total: int) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        quantize_checkpoint(src, dst, QuantSpec(bits=8, quant_type="int8"), force=True, progress=fail)
    assert _leftovers(tmp_path) == ["out"] and sorted(p.name for p in dst.iterdir()) == before
    assert spec_from_config(json.loads((dst / "config.json").read_text())["quantization_config"]) == NF4


def test_existing_destination_needs_force(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(UsageError, match="already exists"):
        quantize_checkpoint(src, dst, NF4)
    assert (dst / "keep.txt").exists()
    # --force replaces a checkpoint or an empty folder, never a folder of other files.
    with pytest.raises(UsageError, match="only a checkpoint"):
        quantize_checkpoint(src, dst, NF4, force=True)
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]
    (dst / "config.json").write_text("{}")
    quantize_checkpoint(src, dst, NF4, force=True)
    assert not (dst / "keep.txt").exists() and (dst / "config.json").exists()
    assert _leftovers(tmp_path) == ["out"]


@pytest.mark.parametrize("where", ["inside", "same", "parent"])
def test_destination_inside_source_is_refused(src: Path, where: str) -> None:
    dst = {"inside": src / "q4", "same": src, "parent": src.parent}[where]
    with pytest.raises(UsageError):
        quantize_checkpoint(src, dst, NF4, force=True)
    assert not (src / "q4").exists() and (src / "config.json").exists()


def test_not_deepseek_is_refused(src: Path, tmp_path: Path) -> None:
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError):
        quantize_checkpoint(src, tmp_path / "out", NF4)
    assert _leftovers(tmp_path) == []


def test_missing_expert_tensors_are_refused(src: Path, tmp_path: Path) -> None:
    config = json.loads((src / "config.json").read_text())
    config["n_routed_experts"] = 32  # the files hold 16 experts per layer
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing"):
        quantize_checkpoint(src, tmp_path / "out", NF4)
    assert _leftovers(tmp_path) == []


def test_truncated_shard_is_refused(src: Path, tmp_path: Path) -> None:
    shard = src / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError):
        quantize_checkpoint(src, tmp_path / "out", NF4)
    assert _leftovers(tmp_path) == []


def test_already_quantized_source_is_refused(src: Path, tmp_path: Path) -> None:
    quantize_checkpoint(src, tmp_path / "q", NF4)
    with pytest.raises(CheckpointError):
        quantize_checkpoint(tmp_path / "q", tmp_path / "again", NF4)
    assert _leftovers(tmp_path) == ["q"]


# ---------------------------------------------------------------------- the destination is never someone else's


def test_a_folder_appearing_at_dst_is_never_deleted(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"

    def someone_else(done: int, total: int) -> None:
        if not dst.exists():
            dst.mkdir()  # empty, which a plain rename would silently replace
            (tmp_path / "theirs").mkdir()

    with pytest.raises(UsageError, match="appeared while converting"):
        quantize_checkpoint(src, dst, NF4, progress=someone_else)
    assert dst.is_dir() and list(dst.iterdir()) == []
    assert _leftovers(tmp_path) == ["out", "theirs"]


def test_a_partial_left_by_a_dead_process_is_named_and_removed(src: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(gone.stdout)  # this process has exited and been reaped
    stale = tmp_path / f"out.partial-{dead_pid}"
    stale.mkdir()
    (stale / "shard-00000.tmp").write_bytes(b"half a shard")
    report = quantize_checkpoint(src, tmp_path / "out", NF4)
    assert report.removed_partials == (stale,)
    assert _leftovers(tmp_path) == ["out"]


def test_a_partial_of_a_live_process_is_left_alone(src: Path, tmp_path: Path) -> None:
    import os

    live = tmp_path / f"out.partial-{os.getppid()}"  # our parent is alive
    live.mkdir()
    with pytest.raises(UsageError, match=f"being written by process {os.getppid()}"):
        quantize_checkpoint(src, tmp_path / "out", NF4)
    assert _leftovers(tmp_path) == [live.name]


def test_sigterm_cleans_up_like_ctrl_c(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import signal

    from cli_runner import run_cli
    from dsmoe.checkpoint.memory import ReleaseEvery

    calls = []
    original = ReleaseEvery.processed

    def terminate_midway(self, nbytes: int) -> None:  # type: ignore[no-untyped-def]
        calls.append(nbytes)
        if len(calls) == 10:
            os.kill(os.getpid(), signal.SIGTERM)
        original(self, nbytes)

    monkeypatch.setattr(ReleaseEvery, "processed", terminate_midway)
    before = signal.getsignal(signal.SIGTERM)
    result = run_cli(capsys, "quantize", str(src), str(tmp_path / "out"))
    assert result.code == 130 and "interrupted" in result.err and len(calls) == 10
    assert _leftovers(tmp_path) == [] and signal.getsignal(signal.SIGTERM) == before
