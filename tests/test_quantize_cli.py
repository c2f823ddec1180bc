"""``dsmoe quantize`` end to end: the folder it writes loads to the same model as quantize-on-load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsmoe import load
from dsmoe.checkpoint.reader import Checkpoint
from tests.cli_runner import run_cli


def test_quantize_command_writes_a_loadable_checkpoint(
    capsys: pytest.CaptureFixture[str], tiny_path: Path, tmp_path: Path
) -> None:
    dst = tmp_path / "q4"
    result = run_cli(capsys, "quantize", str(tiny_path), str(dst), "--bits", "4", "--quant-type", "fp4")
    assert result.code == 0, result.err
    assert "tensors quantized" in result.out and "MB/s" in result.out
    assert (dst / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q4"]

    ids = torch.tensor([[1, 5, 9, 17, 33, 65]])
    stored, _ = load(dst, dtype=torch.float32)
    on_load, _ = load(tiny_path, dtype=torch.float32, bits=4, quant_type="fp4")
    with torch.no_grad():
        torch.testing.assert_close(stored(ids), on_load(ids), rtol=0, atol=1e-5)

    # bench reads the stored format: 4-bit bytes per token, not bf16's.
    bench = run_cli(capsys, "bench", "--model", str(dst), "--prompt-tokens", "4", "--new-tokens", "3", "--json")
    assert bench.code == 0, bench.err
    assert json.loads(bench.out)["bits"] == 4


def test_quantize_command_refuses_existing_output_and_bad_values(
    capsys: pytest.CaptureFixture[str], tiny_path: Path, tmp_path: Path
) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    existing = run_cli(capsys, "quantize", str(tiny_path), str(dst), "--bits", "8")
    assert existing.code == 1
    assert "already exists" in existing.err and "--force" in existing.err
    assert "Traceback" not in existing.err

    bad_bits = run_cli(capsys, "quantize", str(tiny_path), str(tmp_path / "x"), "--bits", "3")
    assert bad_bits.code == 1 and "bits must be 4 or 8" in bad_bits.err
    assert not (tmp_path / "x").exists()

    forced = run_cli(capsys, "quantize", str(tiny_path), str(dst), "--bits", "8", "--force")
    assert forced.code == 0, forced.err
    assert (dst / "model.safetensors.index.json").is_file() or list(dst.glob("*.safetensors"))


def test_quantize_writes_by_default_what_a_run_uses_and_loads_to_the_same_logits(
    capsys: pytest.CaptureFixture[str], tiny_path: Path, tmp_path: Path
) -> None:
    """The default layout is the benchmarked one: kernel-layout 4-bit weights and a q6 lm_head."""
    dst = tmp_path / "q4k"
    result = run_cli(capsys, "quantize", str(tiny_path), str(dst), "--bits", "4")
    assert result.code == 0, result.err
    config = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert config["dsmoe_kernel_layout"] is True and config["dsmoe_lm_head"] == "q6"
    ids = torch.tensor([[1, 5, 9, 17, 33, 65]])
    stored, _ = load(dst)
    on_load, _ = load(tiny_path, bits=4, no_cache=True)
    module = "model.layers.1.self_attn.q_proj"
    assert torch.equal(Checkpoint(dst).get(f"{module}.weight"), on_load.get_submodule(module).weight)
    assert torch.equal(Checkpoint(dst).get("lm_head.weight"), on_load.lm_head.weight)
    with torch.no_grad():
        assert torch.equal(stored(ids), on_load(ids))


def test_the_transformers_layout_keeps_bitsandbytes_order_and_a_float_lm_head(
    capsys: pytest.CaptureFixture[str], tiny_path: Path, tmp_path: Path
) -> None:
    dst = tmp_path / "q4t"
    result = run_cli(capsys, "quantize", str(tiny_path), str(dst), "--bits", "4", "--layout", "Transformers")
    assert result.code == 0, result.err
    config = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert "dsmoe_kernel_layout" not in config and "dsmoe_lm_head" not in config
    stored = Checkpoint(dst)
    assert not any(name.endswith("native_scales") for name in stored.tensor_names())
    assert stored.get("lm_head.weight").dtype == Checkpoint(tiny_path).get("lm_head.weight").dtype
    ids = torch.tensor([[1, 5, 9, 17, 33, 65]])
    loaded, _ = load(dst)
    on_load, _ = load(tiny_path, bits=4, no_cache=True)
    with torch.no_grad():
        assert torch.equal(loaded(ids), on_load(ids))

    bad = run_cli(capsys, "quantize", str(tiny_path), str(tmp_path / "x"), "--layout", "gguf")
    assert bad.code == 1 and "--layout must be one of dsmoe, transformers" in bad.err
